"""The decode graph's argmax against torch.argmax: random rows, ties inside a chunk and across chunks (the lowest
index wins, as torch's), a vocabulary that is not a multiple of the chunk."""
import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

from lowbit.kernels.greedy import CHUNK, argmax_rows, argmax_rows_ref  # noqa: E402

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if GPU else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,V", [(1, 320), (3, 2 * CHUNK + 17), (5, 49152)])
def test_argmax_rows_matches_torch(dtype, B, V):
    x = torch.randn(B, V, generator=torch.Generator().manual_seed(B * V)).to(dtype)
    out = argmax_rows(x.to(DEV)).cpu()
    assert out.dtype == torch.int64 and torch.equal(out, argmax_rows_ref(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_argmax_rows_ties_take_the_lowest_index(dtype):
    V = 3 * CHUNK + 5
    x = torch.zeros(4, V, dtype=dtype)
    x[0, [7, 9]] = 5  # a tie inside one chunk
    x[1, [CHUNK + 3, 2 * CHUNK + 1, V - 1]] = 5  # across chunks
    x[2, [V - 1, 0]] = 5  # the first and the last entries
    x[3] = -1  # every entry equal
    out = argmax_rows(x.to(DEV)).cpu()
    assert out.tolist() == [7, CHUNK + 3, 0, 0] == argmax_rows_ref(x).tolist()
