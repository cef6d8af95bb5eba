"""Packing boundaries (positions, block-diagonal mask), padded collate, and the resumable loader."""

import pytest
import torch

from qattune.data import (
    IGNORE_INDEX,
    Sample,
    StatefulDataLoader,
    TokenizedDataset,
    block_causal_mask,
    epoch_indices,
    pack_samples,
    padded_collate,
)
from qattune.errors import QattuneError


def doc(start, n):
    tokens = list(range(start, start + n))
    return Sample.from_mask(tokens, [True] * n)


def test_pack_positions_restart_and_padding():
    packs = pack_samples([doc(10, 3), doc(20, 4), doc(30, 2)], max_seq_len=8, pad_id=0, split_across_pack=False)
    assert len(packs) == 2  # 3 + 4 fill 7 of 8; the 2-token doc does not fit the 1 left -> new pack
    first, second = packs
    assert first["tokens"].tolist() == [10, 11, 12, 20, 21, 22, 23, 0]
    assert first["input_pos"].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert first["document_ids"].tolist() == [0, 0, 0, 1, 1, 1, 1, 2]
    assert first["labels"].tolist() == [11, 12, IGNORE_INDEX, 21, 22, 23, IGNORE_INDEX, IGNORE_INDEX]
    assert second["tokens"].tolist() == [30, 31] + [0] * 6
    assert second["labels"].tolist() == [31] + [IGNORE_INDEX] * 7


def test_pack_split_across_pack_leaves_no_padding():
    packs = pack_samples([doc(10, 5), doc(20, 6)], max_seq_len=4, pad_id=0, split_across_pack=True)
    flat = torch.cat([p["tokens"] for p in packs]).tolist()
    assert flat == list(range(10, 15)) + list(range(20, 26)) + [0]
    assert [p["input_pos"].tolist() for p in packs] == [[0, 1, 2, 3], [0, 0, 1, 2], [0, 1, 2, 0]]
    # the label at a cut still names the true next token of the document
    assert packs[0]["labels"][-1].item() == 14
    with pytest.raises(QattuneError, match="sample 0 has 5 tokens, more than max_seq_len=4"):
        pack_samples([doc(10, 5)], max_seq_len=4, pad_id=0, split_across_pack=False)


def test_block_causal_mask_matches_definition():
    document_ids = torch.tensor([[0, 0, 1, 1, 1, 2]])
    mask = block_causal_mask(document_ids)[0]
    for i in range(6):
        for j in range(6):
            expected = j <= i and document_ids[0, i] == document_ids[0, j]
            assert mask[i, j].item() == expected


def test_collate_pads_plain_items_and_masks_packs():
    ds = TokenizedDataset([doc(5, 3), doc(7, 1)], pad_id=9)
    batch = padded_collate([ds[0], ds[1]], pad_id=9)
    assert batch["tokens"].tolist() == [[5, 6, 7], [7, 9, 9]]
    assert batch["labels"].tolist() == [[6, 7, IGNORE_INDEX], [IGNORE_INDEX] * 3]
    assert set(batch) == {"tokens", "labels"}
    packs = pack_samples([doc(1, 2), doc(3, 2)], 4, 0, False)
    packed = padded_collate(packs)
    assert packed["mask"].shape == (1, 4, 4) and packed["input_pos"].tolist() == [[0, 1, 0, 1]]
    assert not packed["mask"][0, 2, 1] and packed["mask"][0, 3, 2]
    with pytest.raises(QattuneError, match="a batch item has 3 tokens, more than max_seq_len=2"):
        padded_collate([ds[0]], max_seq_len=2)


def test_epoch_indices_shard_the_global_order():
    full = epoch_indices(11, epoch=2, shuffle=True, seed=7, rank=0, world_size=1)
    assert sorted(full) == list(range(11))
    assert full == torch.randperm(11, generator=torch.Generator().manual_seed(9)).tolist()
    shards = [epoch_indices(11, 2, True, 7, r, 2) for r in range(2)]
    assert shards[0] == full[:10][0::2] and shards[1] == full[:10][1::2]
    assert epoch_indices(11, 3, True, 7, 0, 1) != full


def _ids_loader(n=10, batch_size=2):
    ds = TokenizedDataset([doc(100 + i, 1) for i in range(n)], pad_id=0)
    return StatefulDataLoader(ds, batch_size, padded_collate, shuffle=True, seed=3)


def test_loader_resumes_exactly_mid_epoch_and_across_epochs():
    straight = _ids_loader()
    order = []
    for epoch in range(2):
        straight.set_epoch(epoch)
        order += [b["tokens"].flatten().tolist() for b in straight]
    assert len(order) == 10 and order[:5] != order[5:]
    first = _ids_loader()
    seen = []
    for batch in first:
        seen.append(batch["tokens"].flatten().tolist())
        if len(seen) == 3:
            break
    state = first.state_dict()
    assert state["epoch"] == 0 and state["batches_done"] == 3
    resumed = _ids_loader()
    resumed.load_state_dict(state)
    seen += [b["tokens"].flatten().tolist() for b in resumed]
    resumed.set_epoch(1)
    seen += [b["tokens"].flatten().tolist() for b in resumed]
    assert seen == order


def test_loader_refuses_a_different_dataset():
    state = _ids_loader(n=10).state_dict()
    with pytest.raises(QattuneError, match="num_samples=10, this run has num_samples=12"):
        _ids_loader(n=12).load_state_dict(state)


def test_a_resume_with_another_seed_or_shuffle_keeps_the_checkpoints_order_and_says_so(caplog):
    state = _ids_loader().state_dict()
    changed = StatefulDataLoader(_ids_loader().dataset, 2, padded_collate, shuffle=False, seed=5, name="dataset")
    with caplog.at_level("WARNING"):
        changed.load_state_dict(state)
    assert (changed.seed, changed.shuffle) == (3, True)
    assert [r.getMessage() for r in caplog.records] == [
        "resuming dataset with seed=5, but the checkpoint's data order was drawn with seed=3: the run continues that "
        "order (a changed seed applies to a fresh run)",
        "resuming dataset with shuffle=False, but the checkpoint's data order was drawn with shuffle=True: the run "
        "continues that order (a changed shuffle applies to a fresh run)"]
    caplog.clear()
    drawn = StatefulDataLoader(_ids_loader().dataset, 2, padded_collate, seed=5, name="dataset", seed_given=False)
    drawn.load_state_dict(state)  # seed=null drew 5: the resume takes the checkpoint's seed without a word
    assert drawn.seed == 3 and not caplog.records


def test_loader_keeps_the_last_partial_batch_when_asked():
    from qattune.data import build_dataloader

    ds = TokenizedDataset([doc(100 + i, 2) for i in range(13)], pad_id=0)
    scored = [b["tokens"][:, 0].tolist() for b in build_dataloader(ds, 8, shuffle=False, drop_last=False)]
    assert scored == [list(range(100, 108)), list(range(108, 113))]
    assert [len(b["tokens"]) for b in build_dataloader(ds, 8, shuffle=False)] == [8]


def test_loader_too_few_names_the_dataset_and_counts_packs():
    from qattune.data import PackedDataset, build_dataloader

    plain = TokenizedDataset([doc(1, 2) for _ in range(5)], pad_id=0)
    with pytest.raises(QattuneError) as err:
        build_dataloader(plain, 8, name="dataset_val")
    assert str(err.value) == ("dataset_val has 5 samples, too few for one batch of 8 per rank on 1 rank(s); "
                              "lower the batch size or use more data")
    packed = PackedDataset([doc(1, 3) for _ in range(5)], max_seq_len=8, pad_id=0, split_across_pack=True)
    with pytest.raises(QattuneError) as err:
        build_dataloader(packed, 4)
    assert str(err.value) == ("the dataset has 2 packs of 8 tokens, too few for one batch of 4 per rank on 1 rank(s); "
                              "lower the batch size or use more data")
    with pytest.raises(QattuneError) as err:
        StatefulDataLoader(TokenizedDataset([], pad_id=0), 8, padded_collate, drop_last=False, name="dataset_val")
    assert str(err.value) == "dataset_val has 0 samples; it needs at least one"


def test_every_validation_sample_is_scored_once_whatever_the_number_of_ranks():
    """Without drop_last the first ranks take one sample more; a rank a batch short reads a filler whose
    labels are all ignored, so every rank runs as many forwards (FSDP) and the filler scores nothing."""
    ds = TokenizedDataset([doc(100 + i, 3) for i in range(5)], pad_id=0)
    for ranks, batch_size in ((2, 2), (8, 1), (3, 4)):
        loaders = [StatefulDataLoader(ds, batch_size, padded_collate, shuffle=False, drop_last=False, rank=r,
                                      world_size=ranks) for r in range(ranks)]
        batches = [list(loader) for loader in loaders]
        assert len({len(b) for b in batches}) == 1  # the same number of forwards on every rank
        scored = [int(row[0]) for rank in batches for b in rank for row, labels in zip(b["tokens"], b["labels"])
                  if (labels != IGNORE_INDEX).any()]
        assert sorted(scored) == list(range(100, 105)), (ranks, batch_size)
    assert epoch_indices(5, 0, False, 0, 0, 2, drop_last=False) == [0, 2, 4]
    assert epoch_indices(5, 0, False, 0, 1, 2, drop_last=False) == [1, 3]
