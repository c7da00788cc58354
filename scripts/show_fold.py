"""Build the folded views on every rank and print their rank groups.

    torchrun --nproc-per-node 8 scripts/show_fold.py --tp 2 --cp 2 --ep 4 --etp 2

Runs on CPU with gloo (or on GPUs with nccl when CUDA is available). Rank 0 prints every
axis' groups in both views, then moves a random activation through the fold transition and
back, printing the collectives each direction issued.
"""

import argparse

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Shard
from torch.distributed.tensor.debug import CommDebugMode

from foldmesh import ATTN_AXES, FLATTENED, MOE_AXES, Fold, to_attn, to_moe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    for name, default in (("tp", 1), ("cp", 1), ("dp", -1), ("pp", 1), ("etp", 1), ("ep", 1),
                          ("edp", -1)):
        p.add_argument(f"--{name}", type=int, default=default)
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    fold = Fold(**vars(args))
    fm = fold.build("cuda" if cuda else "cpu")
    show = dist.get_rank() == 0
    if show:
        print(f"{fm.fold} on {dist.get_world_size()} ranks\n")
        for title, axes in (("attention view", ATTN_AXES), ("MoE view", MOE_AXES)):
            print(title)
            for axis in axes:
                print(f"  {axis:>4} ({fm.fold.size(axis)}): {fm.groups(axis)}")
        print("named sub-meshes (this rank's group)")
        for name in FLATTENED:
            print(f"  {name:>9}: {fm[name].mesh.tolist()}")

    f = fm.fold
    B, S, H = 2 * f.dp, 4 * f.cp * f.tp, 8
    device = "cuda" if cuda else "cpu"
    local = torch.randn(B // f.dp, S // (f.cp * f.tp), H, device=device, requires_grad=True)
    x = DTensor.from_local(local, fm.attn_stage, (Shard(0), Shard(1), Shard(1)),
                           shape=(B, S, H), stride=(S * H, H, 1))
    with CommDebugMode() as fwd:
        y = to_moe(x, fm)
    # experts with their FFN split over etp leave partial sums: emulate that on the way back
    part = DTensor.from_local(y.to_local(grad_placements=(Shard(0), Shard(0), Partial())) / f.etp,
                              fm.moe_stage, (Shard(0), Shard(0), Partial()), shape=y.shape,
                              stride=y.stride(), run_check=False)
    with CommDebugMode() as back:
        z = to_attn(part, fm, like=x)
    with CommDebugMode() as bwd:
        z.to_local().sum().backward()
    same = torch.equal(z.to_local(), local) and torch.allclose(local.grad, torch.ones_like(local))
    if show:
        print(f"\nfold transition of [B, S, H] = {[B, S, H]}: {x.placements} -> {y.placements}")
        print(f"  to_moe forward : {_counts(fwd)}")
        print(f"  to_attn forward: {_counts(back)}")
        print(f"  backward       : {_counts(bwd)}")
        print(f"  round trip exact on values and gradients: {same}")
    dist.destroy_process_group()


def _counts(mode: CommDebugMode) -> str:
    counts = {str(k).split(".")[-1]: v for k, v in mode.get_comm_counts().items()}
    return ", ".join(f"{k} x{v}" for k, v in counts.items()) or "no collectives"


if __name__ == "__main__":
    main()
