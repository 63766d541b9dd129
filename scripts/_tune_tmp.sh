for cfg in "1024 128 1024" "2048 512 4096" "4096 1024 4096" "8192 1024 4096"; do
echo "== ALLOC_ELEMENTS MAX_TILE SCAN_BLOCK = $cfg"
python3 - "$cfg" <<'PY' 2>&1 | grep -E "^page|Error|error" | head -20
import sys
e, t, sb = map(int, sys.argv[1].split())
sys.path.insert(0, "scripts")
import specdec_ops.allocator as A
A._ALLOC_ELEMENTS, A._MAX_TILE, A._SCAN_BLOCK = e, t, sb
import profile_allocator as P
P.main(["--batch-sizes", "1,64,256,1024,4096,16384", "--page-sizes", "16", "--num-draft-tokens", "4,8", "--variants", "fused", "--no-plot", "--out-dir", "/tmp/t"])
PY
done
