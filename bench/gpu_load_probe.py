"""Which state of a process makes loading a GGUF on the GPU crash (a bench/gpu.sh stage).

On the H100 machine, loading a small Mistral-shaped Q4_K_M with every layer offloaded crashed
inside llama_model_load_from_file in the pytest process (tests/engine/test_sampling.py's GPU
fixture), while the benchmark servers loaded the same kind of file. This loads one such file in
a fresh subprocess per variant, each reproducing one thing that process did first, and prints
each variant's exit status (-11: a segmentation fault):

    python3 bench/gpu_load_probe.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOAD = """
from server.engine.llama.native import NativeModel, init_backend
init_backend()
model = NativeModel(PATH, n_gpu_layers=-1, repack=False{devices})
print("loaded", model.n_vocab)
model.close()
"""
VARIANTS = {
    "fresh": "",
    # pytest's skipif(not gpus()) runs at collection, before llama.cpp's backend is initialised
    "gpus() first": "from server.engine.devices import gpus\nprint(gpus())\n",
    # the server passes the placement's devices; the test passes none
    "explicit devices": "from server.engine.devices import gpus\n",
    "gguf writer first": "from tests.gguf_factory import write_gguf\n"
                         "write_gguf(Path(PATH).with_name('w.gguf'), 'llama')\n",
    "pytest's imports": "import tests.conftest, tests.engine.test_sampling, tests.test_devices\n",
}


def main() -> None:
    path = Path(tempfile.mkdtemp()) / "m.gguf"
    subprocess.run([sys.executable, "-m", "tests.gguf_factory", "--shape", "mistral-7b",
                    "--n-layer", "4", "--dtype", "q4_k_m", "--vocab-size", "32000", str(path)],
                   check=True, cwd=ROOT)
    for name, before in VARIANTS.items():
        devices = ", devices=[g.handle for g in gpus()[:1]]" if name == "explicit devices" \
            else ""
        code = (f"from pathlib import Path\nPATH = {str(path)!r}\n{before}"
                f"{LOAD.format(devices=devices)}")
        done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        print(f"{name:20} exit {done.returncode:4}  {' | '.join(tail)[:300]}", flush=True)


if __name__ == "__main__":
    main()
