"""Peak and timeline of the resident memory of one command (RssAnon + RssFile every 20 ms), with its stderr lines.

The figures of BENCHMARKS.md "With today's defaults" for the micro-batch and the loader came from

  PYTHONPATH=$PWD python benchmarks/rss_trace.py python -m gilora_jax.cli -v quantize --model FOLDER --out OUT \
      --method gptq --bits 4 --group-size 128 --symmetric --rank 0 --nsamples 32 --seqlen 512 --calib calib.txt \
      [--batch-size 8]

on benchmarks/model.py's 4-block Qwen3-0.6B-shaped folder (built under /tmp/gilora_model_bench by it).
"""
import subprocess, sys, time, threading
cmd = sys.argv[1:]
p = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, bufsize=1)
t0 = time.time(); samples = []; lines = []
def rd():
  for line in p.stderr:
    lines.append((time.time() - t0, line.rstrip()[:150]))
th = threading.Thread(target=rd, daemon=True); th.start()
while p.poll() is None:
  try:
    with open(f"/proc/{p.pid}/status") as f:
      txt = f.read()
      rss = int(txt.split("VmRSS:")[1].split()[0]) / 2**20
      anon = int(txt.split("RssAnon:")[1].split()[0]) / 2**20
      fil = int(txt.split("RssFile:")[1].split()[0]) / 2**20
    samples.append((time.time() - t0, rss, anon, fil))
  except Exception: pass
  time.sleep(0.02)
th.join(1)
pk = max(samples, key=lambda s: s[1])
print("peak", round(pk[1], 3), "GiB at", round(pk[0], 2), "s; end", round(samples[-1][0], 1))
# coarse timeline: max per 2 s
import collections
b = collections.OrderedDict()
for t, r, a, fl in samples:
  k = int(t // 1)
  if r >= b.get(k, (0, 0, 0))[0]: b[k] = (r, a, fl)
print(" ".join(f"{k}:{v[0]:.2f}={v[1]:.2f}a+{v[2]:.2f}f" for k, v in b.items()))
for t, l in lines:
  if abs(t - pk[0]) < 6 or "block" in l or t < 20: print(round(t, 2), l)
