export PYTHONPATH=$PWD
for v in "1,16,1,shrink" "1,16,1,fused" "1,16,2,fused"; do
  tag=$(echo $v | tr ',' '_')
  NCU_WIDE=$v timeout 150 ncu --clock-control none -k regex:_nf4_gemv_wide -s 2 -c 1 --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats --section SchedulerStats --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio" python3 bench/ncu_driver.py nf4wide > $OUT/ncu_wide_$tag.txt 2>&1
  echo "== $v rc=$?"; grep -E "Duration|Stall|Warp Cycles Per Issued|Achieved Occupancy|Registers Per|Eligible|Active Warps|Memory Throughput|DRAM Throughput|L1/TEX Hit|Mem Busy|Max Bandwidth|Issued Warp|stalled_" $OUT/ncu_wide_$tag.txt | head -30
done
