"""The head/tail split's paths, each against the float64 reference on both backends.

The Triton kernel finds the crossing of mu among the teacher's TOPK largest logits, or, when the
head holds more tokens, by bracket passes over the teacher; the bracket ends either holding few
enough tokens to place from a buffer after pass 2, or a single tied value placed by rank. Each
case below is built to take one path (checked on the Triton backend's split_path codes) and
compared with the reference on both backends, the torch backend both ways (fixture
split_backend): its compiled row split of CPU rows and its torch-ops split (a GPU's rows, or
without numba), whose own paths (head blocks, listed, buckets) have tests of their own below,
as does the compiled split (against the torch-ops split and against a sort). Vocabularies
exceed two of the kernel's blocks (2048 columns) so that brackets, ties and ranks cross block
boundaries.
"""

import os
import subprocess
import sys

import pytest
import torch

from akl_kernels._rows import LossMode, RowLossConfig
from akl_kernels.triton_backend import CAPACITY, SPLIT_PATHS, triton_row_losses
from tests.compare import assert_matches_reference, run_loss, torch_ops_split

NEG_INF = float("-inf")
VOCAB = 5000  # three blocks of 2048
LARGE_VOCAB = 2 * CAPACITY + 1000  # more tokens than the bracket buffer holds


def split_paths(student, teacher, *, mu=0.5, temperature=1.0):
    """The Triton kernel's split path of each row, as (name, bracket passes) pairs."""
    config = RowLossConfig(mode=LossMode.AKL, mu=mu, temperature=temperature, split=True)
    rows = triton_row_losses(student, teacher, None, torch.ones(()), config, compute_grad=False)
    return [(SPLIT_PATHS[code % 8], code // 8) for code in rows.split_path.tolist()]


def check_paths(backend, student, teacher, expected, **kwargs):
    """On the Triton backend, every row's (name, passes) must satisfy expected(name, passes)."""
    if backend == "triton":
        paths = split_paths(student, teacher, **kwargs)
        assert all(expected(name, passes) for name, passes in paths), paths


def _generator(seed):
    return torch.Generator(torch.get_default_device()).manual_seed(seed)  # CUDA under AKL_TEST_DEVICE=cuda


def logits(*shape, scale=1.0):
    return torch.randn(*shape, dtype=torch.float64).mul(scale).float()


def test_flat_teacher_is_bracketed_and_placed_from_the_buffer(split_backend):
    # Heads of ~1500 tokens: bracket passes, then the bracket's tokens placed after pass 2.
    student, teacher = logits(3, VOCAB), logits(3, VOCAB, scale=0.5)
    check_paths(split_backend, student, teacher, lambda name, passes: name == "bracket+buffer" and passes >= 1)
    assert_matches_reference("akl", student, teacher, split_backend)


def test_dense_cluster_at_the_crossing_takes_several_bracket_passes(split_backend):
    # Two thirds of the tokens within 1e-6 of each other, the rest spread around them: the
    # first bracket holds the whole cluster, more tokens than the buffer, so a second pass
    # narrows it.
    student, teacher = logits(2, LARGE_VOCAB), logits(2, LARGE_VOCAB, scale=0.5)
    cluster = torch.rand(2, LARGE_VOCAB, generator=_generator(2)) < 2 / 3
    teacher[cluster] = logits(int(cluster.sum()), scale=1e-6)
    check_paths(split_backend, student, teacher, lambda name, passes: name.startswith("bracket") and passes >= 2)
    assert_matches_reference("akl", student, teacher, split_backend)


def test_near_uniform_teacher(split_backend):
    # Values within 1e-3 of each other: the row's smallest value floors the first bracket.
    student, teacher = logits(2, LARGE_VOCAB), logits(2, LARGE_VOCAB, scale=1e-3)
    check_paths(split_backend, student, teacher, lambda name, passes: name == "bracket+buffer" and passes == 1)
    assert_matches_reference("akl", student, teacher, split_backend)


@pytest.mark.parametrize("mu", [0.3, 0.8])
def test_massive_ties_at_the_crossing_are_placed_by_rank(split_backend, mu):
    # Two values, each held by more tokens than the bracket buffer holds, scattered over every
    # block: the crossing falls inside a group of ties, in the upper value at mu = 0.3 (one
    # bracket pass) and in the lower one at mu = 0.8 (two), and its head part ends mid-row.
    teacher = torch.randint(0, 2, (2, LARGE_VOCAB), generator=_generator(1)).float()
    student = logits(2, LARGE_VOCAB)
    check_paths(split_backend, student, teacher, lambda name, _: name == "bracket+ties", mu=mu)
    assert_matches_reference("akl", student, teacher, split_backend, mu=mu)


def test_every_token_tied(split_backend):
    # One value everywhere (the second row's support ends at 3000): the head is the lowest indices.
    teacher = torch.zeros(2, VOCAB)
    teacher[1, 3000:] = NEG_INF
    student = logits(2, VOCAB)
    check_paths(split_backend, student, teacher, lambda name, _: name.startswith("bracket"), mu=0.3)
    assert_matches_reference("akl", student, teacher, split_backend, mu=0.3)


def test_ties_straddling_blocks_in_the_top_path(split_backend):
    # A head of a few tokens whose crossing value is shared by tokens on both sides of the block
    # boundaries at 2048 and 4096: the running rank must carry across blocks.
    teacher = torch.full((2, VOCAB), -8.0)
    teacher[:, [5, 4999]] = 3.0
    tied = [2040, 2047, 2048, 2049, 4095, 4096, 4097, 10]
    teacher[:, tied] = 2.0
    student = logits(2, VOCAB)
    for mu in (0.3, 0.45, 0.6):
        check_paths(split_backend, student, teacher, lambda name, _: name == "top", mu=mu)
        assert_matches_reference("akl", student, teacher, split_backend, mu=mu)


def test_bracket_with_ties_inside_the_buffer(split_backend):
    # bf16-valued flat teachers: a bracket of few distinct values, each shared by many tokens,
    # placed from the buffer (ties of the crossing value ranked in index order there).
    student = logits(3, VOCAB)
    teacher = logits(3, VOCAB, scale=0.7).bfloat16().float()
    check_paths(split_backend, student, teacher, lambda name, _: name.startswith("bracket"), temperature=2.0)
    assert_matches_reference("akl", student, teacher, split_backend, temperature=2.0)


def test_student_minus_inf_inside_the_teachers_support(split_backend):
    # Bracket passes must then read the student too: its -inf tokens are outside the support.
    student, teacher = logits(2, VOCAB), logits(2, VOCAB, scale=0.5)
    student[:, torch.randperm(VOCAB)[:1500]] = NEG_INF
    check_paths(split_backend, student, teacher, lambda name, _: name.startswith("bracket"))
    assert_matches_reference("akl", student, teacher, split_backend)


def test_mu_one_makes_the_whole_support_head(split_backend):
    student, teacher = logits(2, VOCAB), logits(2, VOCAB, scale=2.0)
    teacher[1, :100] = NEG_INF
    check_paths(split_backend, student, teacher, lambda name, _: name == "all head", mu=1.0)
    _, stats, _ = run_loss("akl", student, teacher, split_backend, mu=1.0)
    assert stats.head_size.tolist() == [VOCAB, VOCAB - 100]
    assert_matches_reference("akl", student, teacher, split_backend, mu=1.0)


def test_many_rows_mixing_paths(split_backend):
    # More rows than the kernel's programs (8 on a CPU): each program takes several rows in turn,
    # with its buffer reused between them.
    n = 20
    student = logits(n, 3000)
    teacher = torch.cat([logits(7, 3000, scale=4.0), logits(7, 3000, scale=0.5),
                         torch.randint(-2, 2, (6, 3000)).float()])
    teacher = teacher[torch.randperm(n)]
    if split_backend == "triton":
        names = {name for name, _ in split_paths(student, teacher)}
        assert {"top", "bracket+buffer"} <= names, names
    assert_matches_reference("akl", student, teacher, split_backend)


def torch_split_paths(student, teacher, *, stats=True, mu=0.5, temperature=1.0):
    from akl_kernels.torch_backend import SPLIT_PATHS as TORCH_PATHS, torch_row_losses

    config = RowLossConfig(mode=LossMode.AKL, mu=mu, temperature=temperature, split=True, stats=stats)
    rows = torch_row_losses(student, teacher, None, torch.ones(()), config, compute_grad=True)
    return [TORCH_PATHS[code] for code in rows.split_path.tolist()], rows


@pytest.fixture
def ops_split():
    """The torch backend's split on torch ops (its paths "listed", "buckets", "head blocks"),
    which CPU rows take only without the compiled row split."""
    with torch_ops_split():
        yield


@pytest.fixture
def head_blocks_at_any_size(monkeypatch):
    """The torch backend's head-blocks path for chunks of any size (by default only for chunks
    of 2^19 elements and more, too large for these tests)."""
    from akl_kernels import torch_backend

    monkeypatch.setattr(torch_backend, "HEAD_BLOCKS_MIN_ELEMENTS", 0)


def without_head_blocks(monkeypatch):
    """Turn the torch backend's head-blocks path off: small heads are then listed from the whole chunk."""
    from akl_kernels import torch_backend

    monkeypatch.setattr(torch_backend, "_tokens_near_head", lambda *args: None)


@pytest.mark.parametrize("scale, path", [(4.0, "head blocks"), (4.0, "listed"), (0.5, "buckets")])
def test_torch_backend_split_paths(scale, path, monkeypatch, ops_split, head_blocks_at_any_size):
    # Peaked teachers (heads of a few tokens) are found in the few blocks of 32 tokens that can
    # hold them (V = 5000: the last 8 columns in a window of their own); with that path off,
    # they are listed token by token from the whole chunk; flat ones (heads of ~1500) have their
    # head's buckets summed by a scatter. Each against the reference, with and without
    # statistics (the head size is only counted for statistics on the bucket path).
    if path == "listed":
        without_head_blocks(monkeypatch)
    student, teacher = logits(4, VOCAB), logits(4, VOCAB, scale=scale)
    paths, with_stats = torch_split_paths(student, teacher)
    assert paths == [path] * 4
    assert_matches_reference("akl", student, teacher, "torch")
    _, without_stats = torch_split_paths(student, teacher, stats=False)
    assert torch.equal(with_stats.loss, without_stats.loss)
    assert torch.equal(with_stats.grad, without_stats.grad)
    assert torch.equal(with_stats.stats, without_stats.stats)
    # Without statistics the bucket path leaves the head size uncounted (0).
    expected_size = torch.zeros_like(with_stats.head_size) if path == "buckets" else with_stats.head_size
    assert torch.equal(without_stats.head_size, expected_size)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("mu", [0.1, 0.5, 0.8])
def test_head_blocks_give_the_whole_chunks_head(mu, temperature, monkeypatch, ops_split, head_blocks_at_any_size):
    # The head-blocks path reads only the blocks that its mass bound keeps: its heads must be the
    # ones found from the whole chunk, token for token (head sizes equal), on rows with many ties
    # (bfloat16 values), heads near a block's edge and peaked and flatter rows in one chunk (the
    # logits scaled with T, so that most rows keep small heads).
    generator = torch.Generator().manual_seed(7)
    scales = torch.tensor([2.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0]).repeat(2)[:, None]
    teacher = (torch.randn(16, VOCAB, generator=generator, dtype=torch.float64) * scales * temperature).bfloat16().float()
    teacher[8:, 31] = teacher[8:].amax(1) + 1.0  # the top token at the end of a block
    student = torch.randn(16, VOCAB, generator=generator)
    paths, blocks = torch_split_paths(student, teacher, mu=mu, temperature=temperature)
    assert "head blocks" in paths
    without_head_blocks(monkeypatch)
    _, whole = torch_split_paths(student, teacher, mu=mu, temperature=temperature)
    assert torch.equal(blocks.head_size, whole.head_size)
    torch.testing.assert_close(blocks.stats, whole.stats, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(blocks.grad, whole.grad, rtol=1e-5, atol=1e-7)


def test_head_blocks_at_their_default_size(ops_split):
    # Chunks of 8 rows of 2^17 (2^20 elements, above HEAD_BLOCKS_MIN_ELEMENTS): peaked rows take
    # the head-blocks path unforced, against the reference.
    student, teacher = logits(16, 1 << 17), logits(16, 1 << 17, scale=4.0)
    paths, _ = torch_split_paths(student, teacher)
    assert paths == ["head blocks"] * 16
    assert_matches_reference("akl", student, teacher, "torch")


@pytest.mark.parametrize("temperature", [0.7, 3.0])
@pytest.mark.parametrize("offset", [1e6, 2e7])
def test_large_logits_at_any_temperature(offset, temperature, split_backend, head_blocks_at_any_size):
    # Logits near 1e6 and 2e7 at temperatures whose bucket scale S / T is not a power of two:
    # the torch backend's keys max k - a k round there, and the max token's key could fall
    # below bucket 0 (an index error) before max k was rounded up; the head-blocks path (forced
    # at this size) declines such rows, whose keys may be off by more than its one bucket.
    student = logits(8, VOCAB)
    teacher = logits(8, VOCAB, scale=4.0 * temperature) + offset
    assert_matches_reference("akl", student, teacher, split_backend, temperature=temperature)


@pytest.mark.parametrize("mode", ["akl", "tvd"])
def test_small_tail_gap_beside_a_head_of_thousands(mode, split_backend):
    # A uniform teacher at mu = 0.9 (2700 head tokens of 3001, placed by index) and a peaked
    # student: the tail gap, about 0.1, is the total gap (about 2) less the head's. The torch
    # backend summed the listed head's gaps one token at a time in float32, and the tail gap
    # came out 4e-4 off, relative (beyond the float32 tolerance of 2e-4).
    student = logits(2, 3001, scale=30.0)
    teacher = torch.zeros(2, 3001)
    assert_matches_reference(mode, student, teacher, split_backend, mu=0.9)


@pytest.fixture
def compiled_split():
    """The compiled row split (torch_backend.compiled_row_split()), with CPU tensors by default
    (it splits CPU rows, also under AKL_TEST_DEVICE=cuda); skipped where numba is not installed."""
    from akl_kernels import torch_backend

    if torch_backend.compiled_row_split() is None:
        pytest.skip("numba is not installed: CPU rows take the torch-ops split")
    with torch.device("cpu"):
        yield torch_backend.compiled_row_split()


def mixed_rows(generator, vocab):
    """16 teacher rows of the kinds the split meets: peaked, LM-like, flat, near-uniform, a dense
    cluster, integer ties, bfloat16 values, a common offset of 1e6, and -inf in some."""
    def randn(scale):
        return torch.randn(vocab, generator=generator, dtype=torch.float64).mul(scale).float()

    rows = [randn(8.0), randn(4.0), randn(2.0), randn(0.5), randn(1e-3), randn(0.5).where(
        torch.rand(vocab, generator=generator) < 0.5, randn(1e-6)),
        torch.randint(0, 6, (vocab,), generator=generator).float(), randn(3.0).bfloat16().float(),
        randn(0.7).bfloat16().float(), randn(4.0) + 1e6, randn(0.5) + 1e6, randn(2.0)]
    rows += [row.masked_fill(torch.rand(vocab, generator=generator) < 0.3, NEG_INF) for row in rows[:4]]
    return torch.stack(rows)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("mu", [0.1, 0.37, 0.9])
def test_compiled_row_split_gives_the_ops_split_heads(mu, temperature, compiled_split):
    # The compiled row split (CPU rows) and the torch-ops split (a GPU's rows) must find the same
    # head, token for token (head sizes equal), on every kind of row, with -inf in either input.
    generator = torch.Generator().manual_seed(3)
    teacher = mixed_rows(generator, 3001)
    student = torch.randn(teacher.shape, generator=generator)
    student[-1, :200] = NEG_INF
    paths, rows = torch_split_paths(student, teacher, mu=mu, temperature=temperature)
    assert paths == ["rows"] * len(teacher)
    with torch_ops_split():
        ops_paths, ops = torch_split_paths(student, teacher, mu=mu, temperature=temperature)
    assert "rows" not in ops_paths
    assert torch.equal(rows.head_size, ops.head_size)
    torch.testing.assert_close(rows.stats, ops.stats, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows.grad, ops.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_row_split_reads_strided_rows(dtype, compiled_split):
    # Rows read as a view with a row stride beyond V (a slice of wider logits), in float32 and
    # float64 (each its own compiled code), against the reference.
    wide_student, wide_teacher = logits(6, VOCAB + 37).to(dtype), logits(6, VOCAB + 37, scale=0.5).to(dtype)
    student, teacher = wide_student[:, :VOCAB], wide_teacher[:, :VOCAB]
    paths, _ = torch_split_paths(student, teacher)
    assert paths == ["rows"] * 6
    assert_matches_reference("akl", student, teacher, "torch")


def test_whole_support_within_mu_by_rounding(split_backend):
    # 25 equal logits: p = 1/25 rounds down in float32 (0.039999999), so the running mass of all
    # 25 stays within mu = 1 - 1e-8 in float32 sums, while in float64 the last token tips it over:
    # either decision is allowed within rounding (24 or 25 head tokens), and nothing else.
    student, teacher = logits(2, 25), torch.zeros(2, 25)
    _, stats, _ = run_loss("akl", student, teacher, split_backend, mu=1 - 1e-8)
    assert set(stats.head_size.tolist()) <= {24, 25}
    assert_matches_reference("akl", student, teacher, split_backend, mu=1 - 1e-8)


@pytest.mark.parametrize("kind", ["gauss", "cluster", "integers", "huge float64"])
def test_compiled_row_split_against_a_sort(kind, compiled_split):
    # The compiled split alone, on arbitrary masses p (the rule needs no softmax): the head is
    # the longest prefix of the order by value descending, index ascending, whose running mass
    # stays <= mu, at least one token. A dense cluster is bucketed again several times; float64
    # values 2e308 apart overflow the differences of the crossing bucket's second keys.
    generator = torch.Generator().manual_seed(5)
    dtype = torch.float64 if kind == "huge float64" else torch.float32
    a = torch.randn(6, 4000, generator=generator, dtype=torch.float64)
    if kind == "cluster":
        a = torch.where(torch.rand(a.shape, generator=generator) < 0.8, a * 1e-9 + 1.0, a)
    elif kind == "integers":
        a = torch.randint(0, 3, a.shape, generator=generator).double()
    elif kind == "huge float64":
        a[:, :1000] = 1e308 * torch.rand(6, 1000, generator=generator, dtype=torch.float64)
        a[:, 1000:1500] = -1e308
    a = a.to(dtype)
    a[:, -50:] = NEG_INF
    p = torch.rand(a.shape, generator=generator, dtype=dtype).masked_fill(a == NEG_INF, 0.0)
    p /= p.sum(1, keepdim=True)
    q = torch.rand(a.shape, generator=generator, dtype=dtype)
    mu = 0.43
    head_gap, tail_gap, head_size = compiled_split(
        a, p, q, a.amax(1, keepdim=True), a.amin(1, keepdim=True), mu, 64.0, 4096
    )
    for row in range(a.shape[0]):
        order = sorted(range(a.shape[1]), key=lambda j: (-a[row, j].item(), j))
        running = p[row, order].double().cumsum(0)
        in_head = (running <= mu) | (torch.arange(len(order)) == 0)
        head = torch.tensor(order)[in_head]
        gap = (p[row] - q[row]).double().abs()
        assert head_size[row] == len(head), kind
        torch.testing.assert_close(head_gap[row].double(), gap[head].sum(), rtol=1e-6, atol=0.0)
        torch.testing.assert_close(tail_gap[row].double(), gap.sum() - gap[head].sum(), rtol=1e-6, atol=0.0)


FORKED_CHILD_SPLITS = """
import os, torch
torch.set_num_threads(1)  # torch's own OpenMP threads in a parent can hang a forked child
from akl_kernels import _row_split
a = torch.randn(4, 3000) * 0.3
args = (a, a.softmax(1), torch.randn(4, 3000).softmax(1), a.amax(1, keepdim=True), a.amin(1, keepdim=True),
        0.5, 64.0, 4096)
torch.set_num_threads(2)
parent = _row_split.row_split_gaps(*args)  # two threads: numba's thread pool starts
torch.set_num_threads(1)
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    torch.set_num_threads(2)
    child = _row_split.row_split_gaps(*args)
    os.write(write, b"same" if all(torch.equal(x, y) for x, y in zip(parent, child)) else b"differ")
    os._exit(0)
_, status = os.waitpid(pid, 0)
print(os.read(read, 16).decode() if status == 0 else f"child died: {status}")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_compiled_row_split_in_a_forked_child(compiled_split):
    # GNU OpenMP (numba's "omp" threading layer) aborts a forked child that starts the threads
    # its parent had started: such a child must split on one thread, with the parent's results.
    result = subprocess.run([sys.executable, "-c", FORKED_CHILD_SPLITS], capture_output=True, text=True, timeout=300,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.stdout.strip() == "same", result.stdout + result.stderr
