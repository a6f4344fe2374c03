"""Peak memory of both stages on tiny SDXL from a caption file of N lines, each run in a fresh process (the README's
"Prompt files of any length"). Tiny SDXL is the tests' pipeline, built from configs; nothing is downloaded.

    python docs/prompt_memory.py 20 20000 1000000
"""
import os
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import test_logcd  # noqa: E402  (the tiny pipeline and the two-stage script of the tests)

with tempfile.TemporaryDirectory() as root:
    root = pathlib.Path(root)
    pipe = test_logcd.tiny_sdxl.__wrapped__(type("F", (), {"mktemp": lambda self, n: root / n})())
    for n in map(int, sys.argv[1:] or ["20", "1000000"]):
        folder = root / f"lines{n}"
        folder.mkdir()
        (folder / "prompts.txt").write_text("".join(f"{i} a photo of a cat on a red chair by the sea, {'oil ' * 30}\n"
                                                    for i in range(n)))
        t0 = time.time()
        r = subprocess.run([sys.executable, "-c", test_logcd._BOTH_STAGES, test_logcd.HERE, pipe,
                            str(folder / "prompts.txt"), str(folder)], capture_output=True, text=True,
                           env={**os.environ, "LOGCD_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-2000:]
        seen = [line.split(";")[1].strip() for line in r.stdout.splitlines() if line.startswith("prompts seen")]
        print(f"{n} lines ({(folder / 'prompts.txt').stat().st_size / 1e6:.1f} MB): peak "
              f"{int(r.stdout.split('peak KiB')[-1]) / 1024:.0f} MiB, {time.time() - t0:.1f} s for both stages; "
              f"stage 1 {seen[0]}; stage 2 {seen[1]}")
