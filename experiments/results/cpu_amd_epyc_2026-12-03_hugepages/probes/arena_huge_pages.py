import sys, torch, re
sys.path[:0] = ["/work/main", "/work/main/src"]
import cwic_exp, cwic_exp.cpu_decode as CD
from experiments.bench.cpu_decode import PROMPT, calib_batch, chat_ids
def huge_in(arena_ptrs):
    # sum AnonHugePages over smaps entries overlapping the given (start, end) ranges
    tot = 0; cur = None
    for line in open("/proc/self/smaps"):
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if m: cur = (int(m.group(1), 16), int(m.group(2), 16)); continue
        if line.startswith("AnonHugePages") and cur:
            if any(cur[0] < e and s < cur[1] for s, e in arena_ptrs): tot += int(line.split()[1])
    return tot / 1024
model, tok = cwic_exp.load_teacher("smollm2-135m-instruct"); model = model.float().eval()
ids, mask = calib_batch(tok)
d0 = CD.CpuDecoder(model, dtype=torch.bfloat16, max_len=128, mode="dense", dense="own")
d1 = CD.CpuDecoder(model, dtype=torch.bfloat16, max_len=128, mode="dense", dense="own")
cwic_exp.to_cwic(model, stripe_size=192)
st = CD.calibrate_apr(model, ids, 3.0, attention_mask=mask, stats=True, cache={})
c0 = CD.CpuDecoder(model, dtype=torch.bfloat16, max_len=128, mode="cwic")
c1 = CD.CpuDecoder(model, dtype=torch.bfloat16, max_len=128, mode="cwic")
for n, d in (("dense0", d0), ("dense1", d1), ("cwic0", c0), ("cwic1", c1)):
    a = d.arena
    print(n, "advised MB", a.bytes_advised / 2**20, "huge MB", huge_in(a._ranges) if hasattr(a, "_ranges") else "?")
