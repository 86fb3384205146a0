"""The paper's attention masks (§2.2, Fig. 11) against a direct, loop-by-loop definition."""
import pytest
import torch

from dallecli.models.masks import causal_mask, image_attention_mask, paper_layer_kinds, paper_layer_masks

TEXT, GRID = 3, 4


def reference(kind, text_len, grid, kernel=11):
    """May query position q attend to key position k? Written out one case at a time."""
    T = text_len + grid * grid
    mask = torch.zeros(T, T, dtype=torch.bool)
    for q in range(T):
        for k in range(T):
            if k > q:
                allowed = False                     # always causal
            elif k < text_len:
                allowed = True                      # text→text causal; image→all text
            else:                                   # both in the image block
                rq, cq = divmod(q - text_len, grid)
                rk, ck = divmod(k - text_len, grid)
                if kind == "row":                   # back to the same column of the previous row
                    allowed = (rk == rq) or (rk == rq - 1 and ck >= cq)
                elif kind == "column":
                    allowed = ck == cq
                else:
                    allowed = rq - rk <= kernel // 2 and abs(cq - ck) <= kernel // 2
            mask[q, k] = allowed
    return mask


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
@pytest.mark.parametrize("text_len,grid", [(TEXT, GRID), (2, 5)])
def test_masks_match_direct_definition(kind, text_len, grid):
    assert torch.equal(image_attention_mask(kind, text_len, grid), reference(kind, text_len, grid))


def test_conv_mask_with_a_small_kernel_is_a_neighbourhood():
    # kernel 3 on a 5×5 grid: the query at (2, 2) sees (1..2, 1..3) up to itself, and no wrap-around
    text_len, grid = 2, 5
    mask = image_attention_mask("conv", text_len, grid, kernel=3)
    assert torch.equal(mask, reference("conv", text_len, grid, kernel=3))
    q = text_len + 2 * grid + 2
    seen = {divmod(k - text_len, grid) for k in range(text_len, q + 1) if mask[q, k]}
    assert seen == {(1, 1), (1, 2), (1, 3), (2, 1), (2, 2)}
    q0 = text_len + 1 * grid + 0  # (1, 0) must not see (0, 4) across the edge
    assert not mask[q0, text_len + 4]


def test_row_mask_window_at_grid_4_text_3():
    mask = image_attention_mask("row", TEXT, GRID)
    q = TEXT + 1 * GRID + 1  # image-block cell (1, 1)
    assert mask[q, :TEXT].all()  # all text
    visible = [divmod(k - TEXT, GRID) for k in range(TEXT, TEXT + GRID * GRID) if mask[q, k]]
    assert visible == [(0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]


def test_text_queries_never_see_images_and_all_masks_are_causal():
    for kind in ("row", "column", "conv"):
        mask = image_attention_mask(kind, TEXT, GRID)
        assert not mask[:TEXT, TEXT:].any()
        assert torch.equal(mask[:TEXT, :TEXT], causal_mask(TEXT))
        assert not (mask & ~causal_mask(mask.size(0))).any()
        assert mask.diagonal().all()  # every position sees itself: no empty softmax row


def test_layer_kinds_follow_the_paper():
    kinds = paper_layer_kinds(64)
    assert kinds[-1] == "conv"
    assert [i for i in range(1, 64) if kinds[i - 1] == "column"] == list(range(2, 64, 4))
    assert kinds[:8] == ["row", "column", "row", "row", "row", "column", "row", "row"]
    masks = paper_layer_masks(TEXT, GRID, 4)
    assert len(masks) == 4 and masks[0] is masks[2]  # one tensor per kind, shared
    assert torch.equal(masks[1], image_attention_mask("column", TEXT, GRID))
