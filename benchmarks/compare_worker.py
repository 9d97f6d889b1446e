"""One cpc-train run of one source tree, with the time at which every optimizer step ends (benchmarks/compare.py).

    python benchmarks/compare_worker.py --root TREE --threads 1 --out result.json -- --preset fmnist_tiny ...

Runs ``cpc_models.train.main(argv)`` of the tree at ``--root`` (put first on sys.path; the worker checks that this is
the cpc_models it imported) in this process, as ``cpc-train`` would, and records ``time.perf_counter()`` and
``time.process_time()`` after every ``optimizer.step()`` through torch's global optimizer step hook. The step times
are the differences between consecutive marks: everything one training step of that tree costs (data, forward,
backward, optimizer, its logging), through its own public entry point, whatever its internals. It imports nothing
else of this repository, so it works with any revision that has ``cpc_models.train.main``.
"""
import argparse
import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--root', required=True, help='source tree whose cpc_models runs')
    parser.add_argument('--threads', type=int, default=1, help='torch threads')
    parser.add_argument('--out', required=True, help='result JSON')
    parser.add_argument('argv', nargs=argparse.REMAINDER, help='cpc-train options, after --')
    args = parser.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ['--'] else args.argv
    root = Path(args.root).resolve()
    sys.path.insert(0, str(root))

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    torch.set_num_threads(args.threads)
    from cpc_models import train

    if not Path(train.__file__).resolve().is_relative_to(root):
        raise SystemExit(f'imported {train.__file__}, not the cpc_models of {root}')
    marks = []

    def on_step(optimizer, args, kwargs):
        marks.append((time.perf_counter(), time.process_time()))

    handle = register_optimizer_step_post_hook(on_step)
    printed = io.StringIO()
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(printed):
            rc = train.main(argv)
    finally:
        handle.remove()
    result = dict(rc=rc, root=str(root), module=train.__file__, threads=torch.get_num_threads(), argv=argv,
                  marks=marks, wall_s=time.perf_counter() - t0, load_before=load_before,
                  load_after=os.getloadavg(), printed=[line for line in printed.getvalue().splitlines()
                                                       if line.startswith(('runtime:', 'cpcv2', 'cpcv1'))])
    Path(args.out).write_text(json.dumps(result) + '\n')
    return 0 if rc == 0 else 1


if __name__ == '__main__':
    sys.exit(main())
