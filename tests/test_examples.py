"""The end-to-end examples and the training-step bench at tiny size on the CPU (kernels through the interpreter):
fine-tune several PEFT adapters with and without `lora_fast.peft.patch`, serve them in one mixed batch and compare
with PEFT, and the bench's CPU smoke run. Nothing is downloaded."""
import json
import os
import sys

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import finetune_llama  # noqa: E402
import llama_tasks  # noqa: E402
import serve_peft_adapters  # noqa: E402

# one decoder layer: the interpreter runs every kernel launch in Python (a patched step is ~1.5 s here)
TINY_TRAIN = ["--size", "tiny", "--layers", "1", "--device", "cpu", "--batch", "2", "--seq", "12", "--warmup", "0",
              "--lr", "3e-2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two adapters trained 4 steps each (the first with both providers), saved in PEFT format."""
    out = tmp_path_factory.mktemp("adapters")
    report = finetune_llama.main(TINY_TRAIN + ["--steps", "4", "--tasks", "2", "--compare-tasks", "1",
                                               "--out", str(out), "--json", str(out / "report.json")])
    return out, report


def test_task_language_is_deterministic_and_follows_its_rule():
    task = llama_tasks.TaskLanguage(0, vocab=64, noise=0.0)
    x = task.sample(3, 10, seed=4)
    assert torch.equal(x, task.sample(3, 10, seed=4)) and not torch.equal(x, task.sample(3, 10, seed=5))
    assert set(x.flatten().tolist()) <= set(task.alphabet.tolist())
    assert task.rule_accuracy(x[:, :-1], x[:, 1:]) == 1.0  # noise 0: every token is its predecessor's successor
    other = llama_tasks.TaskLanguage(1, vocab=64)
    assert not torch.equal(task.successor, other.successor)
    assert 0 < llama_tasks.TaskLanguage(0, vocab=64).entropy < torch.log(torch.tensor(16.0))


def test_finetune_peft_and_patched_track_and_loss_goes_down(trained):
    out, report = trained
    first, second = report["tasks"]
    peft, ours = first["runs"]["peft"]["losses"], first["runs"]["lora_fast"]["losses"]
    assert len(peft) == len(ours) == 4
    # same init, same batches, dropout 0, fp32: the two curves agree to rounding
    assert first["max_loss_diff"] < 1e-4 * max(peft), (peft, ours)
    for entry in (first, second):
        losses = entry["runs"]["lora_fast"]["losses"]
        assert losses[-1] < losses[0] - 0.2, losses
        assert entry["eval_loss"] < entry["eval_loss_base"]
        assert entry["runs"]["lora_fast"]["tokens_per_s"] > 0
    assert "peft" not in second["runs"]  # --compare-tasks 1
    with open(out / "report.json") as f:
        assert json.load(f)["tasks"][0]["adapter"] == "task0"


def test_saved_adapters_load_in_peft(trained):
    """The saved directories are PEFT's format: PeftModel.from_pretrained reads them back to the trained weights."""
    from peft import PeftModel
    from transformers import LlamaConfig

    out, _ = trained
    meta = json.load(open(out / "base_model.json"))
    assert meta["adapters"] == ["task0", "task1"]
    base = llama_tasks.build_base(LlamaConfig.from_dict(meta["config"]), meta["seed"], "cpu", torch.float32)
    model = PeftModel.from_pretrained(base, str(out / "task1"), adapter_name="task1")
    b = model.base_model.model.model.layers[0].mlp.down_proj.lora_B["task1"].weight  # one layer (TINY_TRAIN)
    assert b.abs().max() > 0  # trained (PEFT initialises lora_B to zero)


def test_serve_matches_peft_per_request(trained, capsys):
    out, _ = trained
    report = serve_peft_adapters.main(["--adapters", str(out), "--device", "cpu", "--requests", "5", "--seq", "7"])
    assert report["ok"] and report["max_rel_err"] < 1e-4
    assert set(report["rule_acc"]) == {"base", "task0", "task1"}
    assert "max relative error vs PEFT" in capsys.readouterr().out


def test_serve_detects_a_wrong_adapter(trained):
    """The check can fail: a request served with another adapter's slot differs from PEFT's."""
    from transformers import LlamaConfig

    out, _ = trained
    meta, dirs = serve_peft_adapters.find_adapters(str(out))
    config = LlamaConfig.from_dict(meta["config"])
    server = serve_peft_adapters.MultiAdapterServer(llama_tasks.build_base(config, meta["seed"], "cpu",
                                                                           torch.float32), dirs)
    tokens = torch.randint(0, config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    _, ref = serve_peft_adapters.peft_reference(llama_tasks.build_base(config, meta["seed"], "cpu", torch.float32),
                                                dirs, tokens, ["task0", "task1"])
    good = server.logits(tokens, torch.tensor([server.slot("task0"), server.slot("task1")]))
    swapped = server.logits(tokens, torch.tensor([server.slot("task1"), server.slot("task0")]))
    assert ((good - ref).norm() / ref.norm()) < 1e-4
    assert ((swapped - ref).norm() / ref.norm()) > 1e-2
    with pytest.raises(ValueError, match="adapter_ids"):
        server.logits(tokens, torch.tensor([5, 0]))


def test_bench_train_step_cpu_smoke(tmp_path):
    import bench_train_step

    assert bench_train_step.main(["--size", "tiny", "--out", str(tmp_path), "--adapter-dtypes", "fp32",
                                  "--dropouts", "0", "--warmup", "0", "--steps", "1", "--seq", "8"]) == 0
    payload = json.load(open(tmp_path / "train_step.json"))
    assert payload["model"]["size"] == "tiny" and payload["env"]["lora_fast"]
    assert {r["provider"] for r in payload["rows"]} == {"base", "peft", "lora_fast"}
    assert all("error" not in r for r in payload["rows"]), payload["rows"]
    (summary,) = payload["summaries"]
    assert summary["check"]["passed"] and summary["check"]["grad_rel_err"] < 1e-4, summary["check"]
    assert summary["check"]["n_grads"] == 2 * 7 * 2  # A and B of 7 modules in the 2 layers of size "tiny"
