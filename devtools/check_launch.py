"""`make check-env`: the installed environment can launch data-parallel processes on this machine.

Run as ``accelerate launch --multi_gpu --num_processes 2 devtools/check_launch.py``: every rank all-reduces its
rank + 1 (gloo on CPU, NCCL on GPUs) and checks the sum, so a broken launcher or backend fails loudly.
"""

import torch
from accelerate import Accelerator

acc = Accelerator(cpu=not torch.cuda.is_available())
device = acc.device
total = acc.reduce(torch.tensor([float(acc.process_index + 1)], device=device), reduction="sum")
expected = acc.num_processes * (acc.num_processes + 1) / 2
backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
print(f"rank {acc.process_index}/{acc.num_processes} backend={backend} all-reduce sum={total.item()}")
assert total.item() == expected, f"all-reduce gave {total.item()}, expected {expected}"
acc.end_training()  # destroys the process group; without it gloo aborts the processes at exit
