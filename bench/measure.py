"""bench/measure.py: what the memory benchmarks (convert_memory.py, memory.py) share.

A full-size hub checkpoint with random weights, built once into a work folder, and the peak resident memory of a
command run in a fresh child process. Imports no torch: Linux starts a child's ru_maxrss at its parent's peak RSS
(the high-water mark carries over fork and exec), so the process that measures must stay small.

    python bench/measure.py amused-256 /tmp/amused-memory/amused-256    # build one (what hub_checkpoint runs)
"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def hub_checkpoint(size: str, folder: Path) -> Path:
    """The random-weight `size` checkpoint ("amused-256" or "amused-512") in hub layout at `folder`, built there on
    first use. The builder runs in a child: it holds the whole fp32 model, whose peak would be every later child's
    starting ru_maxrss."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    if not (folder / "model_index.json").exists():
        print(f"building a random-weight {size} checkpoint in {folder} ...", flush=True)
        subprocess.run([sys.executable, __file__, size, str(folder)], check=True)
    return folder


def build(size: str, folder: Path) -> None:
    """diffusers' pipeline with random weights, saved with save_pretrained (needs requirements-dev.txt), into a
    temporary folder renamed at the end: an interrupted build leaves nothing that looks complete."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import SHARED_TOKENIZER, reference_pipeline, save_hub_checkpoint, write_tiny_tokenizer

    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shared = (SHARED_TOKENIZER / "vocab.json").exists()  # as tests/conftest.py's needs_shared_tokenizer asks
    tok = SHARED_TOKENIZER if shared else write_tiny_tokenizer(folder.parent / "tokenizer")
    save_hub_checkpoint(reference_pipeline(size, tok), partial, tok)
    partial.rename(folder)


def peak_rss(cmd: list[str], log: Path) -> tuple[int, float]:
    """Run `cmd` in a fresh child process, its output to `log` -> (its peak RSS in bytes, its seconds).

    os.wait4 returns that one child's rusage (RUSAGE_CHILDREN would be the largest of all children so far).
    Raises RuntimeError, with the end of the log, if the command fails."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    if proc.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-5:])
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}; end of {log}:\n{tail}")
    return usage.ru_maxrss * 1024, seconds  # Linux reports KiB


def fp32_weight_bytes(folder: Path) -> int:
    """Bytes of the fp32 weight files of a hub folder (their headers, a few KiB, included)."""
    return sum(f.stat().st_size for f in folder.rglob("*.safetensors") if ".fp16." not in f.name)


if __name__ == "__main__":
    build(sys.argv[1], Path(sys.argv[2]))
