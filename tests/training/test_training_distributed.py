"""Two gloo processes with FSDP2 (and activation checkpointing) give the same losses as one process with the same global batch,
and resume exactly from a checkpoint gathered on rank 0."""

import json
import os
import socket

import torch
import torch.multiprocessing as mp
from training_toys import learnable_dataset, make_model

from qattune.data import build_dataloader
from qattune.training import (
    AdamW,
    CrossEntropyLoss,
    apply_activation_checkpointing,
    Trainer,
    destroy_distributed,
    gather_full_state_dict,
    get_cosine_schedule_with_warmup,
    init_distributed,
    load_full_state_dict,
    num_training_steps,
    shard_model,
    shard_model_from_rank0,
)

GLOBAL_BATCH = 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _trainer(model, world: int, out_dir: str) -> Trainer:
    if world > 1:  # the sharded run also recomputes activations: numerics must not change
        apply_activation_checkpointing(model)
        shard_model(model)
    # one process: 1 micro-batch of 4; two processes: 2 micro-batches of 1 each, so the token weighting
    # is exercised across micro-batches and ranks at once (same 4 samples per step either way)
    accum = 1 if world == 1 else 2
    loader = build_dataloader(learnable_dataset(32), batch_size=GLOBAL_BATCH // world // accum, shuffle=True, seed=5)
    optimizer = AdamW(model.parameters(), lr=3e-3)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 1, num_training_steps(len(loader), accum, 1, 4))

    def save_model(directory: str, step: int) -> None:
        state = gather_full_state_dict(model)
        if state:
            torch.save(state, os.path.join(directory, "model.pt"))

    return Trainer(
        model, optimizer, CrossEntropyLoss(), loader, lr_scheduler=scheduler, max_steps_per_epoch=4, clip_grad_norm=1.0,
        gradient_accumulation_steps=accum,
        output_dir=out_dir, save_model=save_model, save_every_n_steps=2, progress_bar=False,
    )


def _train_and_resume(world: int, rank: int, out_dir: str) -> dict:
    losses = _trainer(make_model(), world, out_dir).fit()
    model = make_model(seed=99)
    full = torch.load(os.path.join(out_dir, "step_2", "model.pt")) if rank == 0 else {}
    trainer = _trainer(model, world, out_dir + "_resumed")
    load_full_state_dict(model, full)
    trainer.load_checkpoint(os.path.join(out_dir, "step_2"))
    resumed = trainer.fit()
    final = gather_full_state_dict(model)
    return {"losses": losses, "resumed": resumed, "final": {k: v.tolist() for k, v in final.items()}}


def _join_gloo_group(rank: int, world: int, port: int) -> None:
    """What torchrun would set up for this spawned process: its rank in a CPU (gloo) group."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    init_distributed("cpu")


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    _join_gloo_group(rank, world, port)
    try:
        result = _train_and_resume(world, rank, out_dir)
        if rank == 0:
            with open(os.path.join(os.path.dirname(out_dir), "result.json"), "w") as handle:
                json.dump(result, handle)
    finally:
        destroy_distributed()


def test_two_gloo_processes_match_one_process(tmp_path):
    single = _train_and_resume(world=1, rank=0, out_dir=str(tmp_path / "single" / "out"))
    (tmp_path / "multi").mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "multi" / "out")), nprocs=2, join=True)
    multi = json.loads((tmp_path / "multi" / "result.json").read_text())
    assert len(multi["losses"]) == 4
    assert max(abs(a - b) for a, b in zip(multi["losses"], single["losses"])) < 1e-5
    assert multi["losses"][0] != multi["losses"][3]
    # the resumed 2-process run (model broadcast from rank 0, optimizer state re-sharded) continues exactly
    assert multi["resumed"] == multi["losses"][2:]
    assert single["resumed"] == single["losses"][2:]
    # final models compute the same function (compared by outputs: Adam turns the float noise in
    # gradients that should be exactly zero, such as the key bias's, into visible parameter noise)
    tokens = torch.arange(12).remainder(32)[None]
    outputs = []
    for final in (single["final"], multi["final"]):
        model = make_model()
        model.load_state_dict({k: torch.tensor(v) for k, v in final.items()})
        with torch.no_grad():
            outputs.append(model(tokens))
    assert torch.allclose(outputs[0], outputs[1], atol=1e-4)


def _shard_from_rank0_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    _join_gloo_group(rank, world, port)
    try:
        if rank == 0:
            model = make_model(seed=3)
        else:  # the other ranks never hold weights before sharding
            with torch.device("meta"):
                model = make_model(seed=3)
        shard_model_from_rank0(model, torch.device("cpu"))
        local = {name: (p.to_local().numel(), p.numel()) for name, p in model.named_parameters()}
        full = gather_full_state_dict(model)
        if rank == 0:
            torch.save({"local": local, "full": full}, os.path.join(out_dir, "rank0.pt"))
        torch.save({"local": local}, os.path.join(out_dir, f"rank{rank}_local.pt"))
    finally:
        destroy_distributed()


def test_shard_from_rank0_gives_each_rank_its_shard_of_rank0_weights(tmp_path):
    mp.spawn(_shard_from_rank0_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    result = torch.load(tmp_path / "rank0.pt")
    reference = make_model(seed=3).state_dict()
    assert result["full"].keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(result["full"][name], tensor), name
    for rank in (0, 1):
        local = torch.load(tmp_path / f"rank{rank}_local.pt")["local"]
        for name, (held, total) in local.items():  # rows split by torch.chunk: ceil(n/2) on rank 0
            rows = reference[name].shape[0]
            share = (rows + 1) // 2 if rank == 0 else rows // 2
            assert held == share * total // rows, (rank, name)
