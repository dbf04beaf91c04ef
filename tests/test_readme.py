"""The README's quickstart snippet runs as pasted (on the CPU here: CUDA hidden, no interpreter, as a user's CPU
machine) and means what its comments say: after merge() the shared base linear gives the LoRA output."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECKS = """
with torch.no_grad():
    assert layer.lora_B.abs().sum() > 0, "the optimizer step trained B: the delta is not zero"
    torch.testing.assert_close(base(x), y, rtol=1e-4, atol=1e-4)   # the merged base gives the LoRA output
    torch.testing.assert_close(layer(x), y, rtol=1e-4, atol=1e-4)  # and so does the merged layer
    layer.unmerge()
    torch.testing.assert_close(layer(x), y, rtol=1e-4, atol=1e-4)
print("README quickstart checks passed")
"""


def quickstart_snippet() -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("## Quickstart", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_quickstart_runs_as_pasted():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-c", quickstart_snippet() + CHECKS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "trainable params" in proc.stdout and "README quickstart checks passed" in proc.stdout
