# Nsight Compute on the one-row NF4 GEMV's "wide" kernel (K = N = 4096, M = 1, bf16; bench/ncu_driver.py nf4wide):
# occupancy, warp state, memory and the stall reasons per issued instruction for each NCU_WIDE variant
# ("warps,splits,stages,xa_mode"); with NCU_SOURCE="1,16,1,fused" also the warp stall samples per SASS line of that
# variant (ncu --set full, summarised by bench/ncu_stalls.py). Writes $OUT/ncu_wide_*.txt.
#     OUT=/tmp/out [VARIANTS="1,16,1,shrink 1,16,1,fused"] [NCU_SOURCE=1,16,1,fused] bash bench/ncu_wide_variants.sh
export PYTHONPATH=$PWD
for v in ${VARIANTS-"1,16,1,shrink" "1,16,1,fused" "1,16,2,fused"}; do
  tag=$(echo $v | tr ',' '_')
  NCU_WIDE=$v timeout 150 ncu --clock-control none -k regex:_nf4_gemv_wide -s 2 -c 1 --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats --section SchedulerStats --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio" python3 bench/ncu_driver.py nf4wide > $OUT/ncu_wide_$tag.txt 2>&1
  echo "== $v rc=$?"; grep -E "Duration|Stall|Warp Cycles Per Issued|Achieved Occupancy|Registers Per|Eligible|Active Warps|Memory Throughput|DRAM Throughput|L1/TEX Hit|Mem Busy|Max Bandwidth|Issued Warp|stalled_" $OUT/ncu_wide_$tag.txt | head -70
done
if [ -n "${NCU_SOURCE:-}" ]; then
  tag=$(echo $NCU_SOURCE | tr ',' '_')
  NCU_WIDE=$NCU_SOURCE timeout 200 ncu --clock-control none --set full --import-source yes -k regex:_nf4_gemv_wide -s 2 -c 1 -f -o $OUT/ncu_wide_src python3 bench/ncu_driver.py nf4wide > $OUT/ncu_wide_src_$tag.log 2>&1
  ncu --import $OUT/ncu_wide_src.ncu-rep --page source --csv --print-source sass > $OUT/ncu_wide_sass_$tag.csv 2>&1
  python3 bench/ncu_stalls.py $OUT/ncu_wide_sass_$tag.csv --top 30 | tee $OUT/ncu_wide_stalls_$tag.txt
  rm -f $OUT/ncu_wide_src.ncu-rep
fi
