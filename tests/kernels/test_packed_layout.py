"""The packed weights' layouts (lowbit/kernels/packed_layout.py): the repacking holds the checkpoint's values, and the
paired int4 layout holds the tile-planar one's. (The kernels that read them: test_kernels.py.)"""
import torch

from lowbit.kernels import packed_layout as pl


def random_values(E, N, K, groups, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(-8, 8, (E, N, K), generator=g, dtype=torch.int8)
    scale = torch.rand(E, N, groups, generator=g) * 0.01 + 1e-3
    zp = torch.randint(-8, 8, (E, N, groups), generator=g, dtype=torch.int8)
    return values, scale, zp


def test_repack_holds_the_values_in_tile_planar_order():
    """Word w of a row's tile t holds k = t * 256 + j * 32 + w in its j-th nibble, plus 8; K pads with zeros."""
    values, scale, zp = random_values(1, 3, 300, 3, seed=1)
    pw = pl.repack(values, scale, zp, 4, 128)
    assert pw.words.shape == (1, 3, 512 // 8) and not pw.paired
    w = pw.words.to(torch.int64) & 0xFFFFFFFF
    for t, j, word in ((0, 0, 0), (0, 7, 31), (1, 1, 5)):
        k = t * 256 + j * 32 + word
        expect = values[0, 2, k].item() if k < 300 else 0
        assert ((w[0, 2, t * 32 + word] >> (4 * j)) & 15).item() - 8 == expect
    v, s, z = pl.values(pw)
    assert torch.equal(v, values) and torch.equal(s, scale) and torch.equal(z, zp)


def test_paired_layout_holds_the_planar_values():
    """The paired int4 layout (`pair`): the same values, scales and zero points; a word of a tile's first
    half holds planes 0-3 at k = 2p (bits 0-15) and k = 2p + 1 (bits 16-31), its second half planes 4-7; unpaired it
    is the planar layout again."""
    values, scale, zp = random_values(2, 5, 600, 10, seed=3)
    planar = pl.repack(values, scale, zp, 4, 64)
    paired = pl.repack(values, scale, zp, 4, 64, paired=True)
    assert paired.paired and not planar.paired and paired.words.shape == planar.words.shape
    assert torch.equal(pl.planar_words(paired), planar.words)
    assert all(torch.equal(a, b) for a, b in zip(pl.values(paired), pl.values(planar)))
    assert torch.equal(pl.values(paired)[0], values)
    w = paired.words.to(torch.int64) & 0xFFFFFFFF
    for t, h, p, nib in ((0, 0, 0, 0), (1, 1, 15, 7), (2, 0, 9, 5), (1, 1, 3, 2)):
        u = (w[1, 4, t * 32 + h * 16 + p] >> (4 * nib)) & 15
        k = t * 256 + (4 * h + nib % 4) * 32 + 2 * p + nib // 4
        assert u.item() - 8 == values[1, 4, k].item()
    # slicing and stacking keep the layout
    assert pl.slice_rows_cols(paired, slice(1, 3), slice(64, 320)).paired
    assert pl.cat_rows([paired, paired]).paired
