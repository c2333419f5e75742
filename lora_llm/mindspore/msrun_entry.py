"""The script that `msrun` starts in every worker: `lora-llm` with MindSpore data parallelism.

    msrun --worker_num 2 --local_worker_num 2 --master_addr 127.0.0.1 --master_port 8129 --join True \\
          --log_dir RUN/msrun_logs  lora_llm/mindspore/msrun_entry.py  train --config FILE --backend mindspore

msrun wants a script path (not `-m`) and starts it with the first `python` on PATH (activate the venv).
Each worker reads MS_WORKER_NUM / MS_ROLE from msrun; lora_llm.mindspore.train then initialises
communication, splits every global batch between the workers and averages their gradients.
"""
import sys
from pathlib import Path

if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]  # not this folder: it shadows nothing, but keep imports clean
    sys.path.insert(0, str(here.parent.parent))
    from lora_llm.cli import main
    sys.exit(main())
