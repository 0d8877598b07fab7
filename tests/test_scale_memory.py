"""Bounded memory, shown by running a step's whole-table part in a subprocess under an
address-space limit (``RLIMIT_AS``), not by timing: MinHash signatures and the noise
filter's projection fit in a budget that the whole-table implementations they replaced
(kept here as controls) overflow."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest

pytestmark = pytest.mark.slow

# Run in the child: build the inputs, then cap the address space at what is mapped now
# plus the budget, then run the step part. Threads are pinned so that thread pools'
# reserved stacks and arenas are not counted against the budget as if they were data.
_CHILD = """
import resource, sys
import numpy as np
{setup}
def mapped() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()
limit = mapped() + {budget_mib} * 2**20
resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
try:
    {run}
except MemoryError:
    import traceback
    traceback.print_exc()
    sys.exit(3)
print("ok")
"""

_THREADS = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "POLARS_MAX_THREADS": "1", "MALLOC_ARENA_MAX": "1", "RAYON_NUM_THREADS": "1"}


def _run_limited(setup: str, run: str, budget_mib: int) -> subprocess.CompletedProcess:
    code = _CHILD.format(setup=textwrap.dedent(setup), run=run, budget_mib=budget_mib)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                          env={**os.environ, **_THREADS})


_PAIRS = """
from tests.test_scale_memory import synthetic_components, synthetic_table
import filters.dedup as dedup
import polars  # imported before the limit: its allocator reserves address space once
import datasketch  # as is scipy, which it imports
components, pair_ids, exact_of = synthetic_components({n})
table = synthetic_table(components, pair_ids)
params = dedup.DedupParams()
dedup._bands(params.candidate_threshold, params.num_perm)  # scipy's integration, a fixed cost
"""


def synthetic_components(n: int, seed: int = 0) -> tuple[list[list[str]], list[str], list[None]]:
    """``n`` distinct pairs of random words (prompt ~20 words, answers ~60 and ~15), one in
    ten a near duplicate of an earlier one (one word changed)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vocabulary = np.array([f"w{i}" for i in range(20_000)])

    def texts(words: int) -> list[str]:
        return [" ".join(row) for row in vocabulary[rng.integers(0, len(vocabulary), (n, words))]]

    parts = [texts(20), texts(60), texts(15)]
    for i in range(10, n, 10):
        source = int(rng.integers(0, i))
        parts[0][i], parts[2][i] = parts[0][source], parts[2][source]
        parts[1][i] = parts[1][source].rsplit(" ", 1)[0] + " changed"
    return parts, [f"p{i}" for i in range(n)], [None] * n


def synthetic_table(components: list[list[str]], pair_ids: list[str]) -> pa.Table:
    """The pairs as the dedup step reads them (prompts as plain strings)."""
    prompts, chosen, rejected = components
    return pa.table({"pair_id": pair_ids, "prompt": prompts, "chosen": chosen, "rejected": rejected})


def test_minhash_signatures_fit_a_bound_the_whole_table_shingle_sets_do_not() -> None:
    # 20k pairs: combined signatures 20k x 128 x 4 B = 10 MiB, one part's signatures of the
    # rows in a candidate pair, a 2k-row chunk's texts and shingles and a 16 MiB permuted block
    # (~90 MiB mapped); every row's shingle sets and MinHash objects at once take ~430 MiB
    setup = _PAIRS.format(n=20_000)
    run = ("dedup._near_minhash(table, dedup._scan(table, params, signatures=True), "
           "np.arange(table.num_rows), params)")
    bounded = _run_limited(setup, run, budget_mib=160)
    assert bounded.returncode == 0, bounded.stdout + bounded.stderr
    control = _run_limited(setup + "from tests.test_dedup import _reference_near_minhash\n",
                           "_reference_near_minhash(components, pair_ids, exact_of, params)", budget_mib=160)
    assert control.returncode == 3, control.stdout + control.stderr[-2000:]


_FEATURES = """
import filters.noise as noise
rng = np.random.default_rng(0)
x_chosen = rng.standard_normal(({n}, {d}), dtype=np.float32)
x_rejected = rng.standard_normal(({n}, {d}), dtype=np.float32)
"""


def _svd_projection(x_chosen, x_rejected, components):  # noqa: ANN001, ANN202 - the control
    import numpy as np

    both = np.vstack([x_chosen, x_rejected]).astype(np.float64)
    centre = both.mean(0)
    basis = np.linalg.svd(both - centre, full_matrices=False)[2][:components].T
    return ((x_chosen - centre) @ basis).astype(np.float32), ((x_rejected - centre) @ basis).astype(np.float32)


def test_projection_fits_a_bound_the_full_svd_does_not() -> None:
    # inputs 2 x 60k x 384 float32 = 176 MiB; the SVD's float64 copies alone are 3 x 352 MiB
    setup = _FEATURES.format(n=60_000, d=384)
    bounded = _run_limited(setup, "noise.project(x_chosen, x_rejected, 128)", budget_mib=200)
    assert bounded.returncode == 0, bounded.stdout + bounded.stderr
    control = _run_limited(setup + "from tests.test_scale_memory import _svd_projection\n",
                           "_svd_projection(x_chosen, x_rejected, 128)", budget_mib=200)
    assert control.returncode == 3, control.stdout + control.stderr[-2000:]


_AUDIT = """
import factory.audit
from factory.audit.compute import audit_frame
from factory.catalog import Catalog
import filters.noise, filters.dedup  # the audit imports them lazily: before the limit
home = {home!r}
factory.audit.audit("small", home=home, compute=False, top=5)  # lazy imports and first allocations
"""


def test_audit_fits_a_bound_the_whole_table_read_does_not(tmp_path) -> None:
    # 40k pairs with ~4 kB answers (~320 MiB of text): the audit streams 8k-row batches
    # (~64 MiB of text each) and keeps ~0.25 kB a pair; the whole-table read the audit
    # began with (and the frame it built on it) holds every text at once
    from factory.catalog import Catalog
    from tests.test_audit_stream import big_table

    home = tmp_path / "home"
    catalog = Catalog(home)
    catalog.commit("small", big_table(200))
    catalog.commit("big", (big_table(10_000, seed=k, start=k * 10_000, pad=4_000) for k in range(4)))
    setup = _AUDIT.format(home=str(home))
    bounded = _run_limited(setup, 'factory.audit.audit("big", home=home, compute=False, top=20)', budget_mib=300)
    assert bounded.returncode == 0, bounded.stdout + bounded.stderr
    control = _run_limited(setup, 'audit_frame(Catalog(home).read_table("big"))', budget_mib=300)
    assert _out_of_memory(control), control.stdout + control.stderr[-2000:]


def _out_of_memory(process: subprocess.CompletedProcess) -> bool:
    """A MemoryError in Python, or Rust (Polars) aborting on a failed allocation."""
    return process.returncode == 3 or (process.returncode == -6 and "memory allocation" in process.stderr)
