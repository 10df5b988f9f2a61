"""Worker for test_train_sft.py::test_ddp_gradients_equal_one_process (not a test itself).

Computes the SFT gradient of a fixed global batch of 8 samples, split over the ranks as
train_sft.py splits it, synchronised as train_sft.py synchronises it; rank 0 saves the result.
Usage: [torchrun --nproc_per_node=N] ddp_grad_worker.py RUN_DIR OUT.pt
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import data  # noqa: E402
import plumbing  # noqa: E402
import posebench  # noqa: E402
import presets  # noqa: E402
import train_sft  # noqa: E402

torch.set_num_threads(1)
run_dir, out = sys.argv[1], sys.argv[2]
ddp, rank, world, device = plumbing.setup_distributed()
policy, tok, _ = presets.load_policy(run_dir, "tiny", trainable=True)
policy.train()
cfg = posebench.BenchConfig(n_train=48, n_val=16, n_test=40)
tasks = data.PoseBenchTasks("train", cfg, seed=0)
idx = list(range(8))[rank::world]
b = data.collate([tasks[i] for i in idx], tok, policy.get_base_model().num_image_tokens)
counts = torch.tensor([(b.labels[:, 1:] != -100).sum().item(), b.pose_valid.sum().item()], dtype=torch.float64)
n_tokens, n_poses = plumbing.all_reduce_sum(counts, ddp).tolist()
logits, dist, _ = policy.forward_hybrid(b.input_ids, b.attention_mask, b.pixel_values, b.pose_token_pos)
loss, _ = train_sft.sft_loss(logits, b.labels, dist, b, train_sft.Args(), n_tokens, n_poses)
loss.backward()
params = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
plumbing.sync_gradients([p for _, p in params], ddp)
if rank == 0:
    torch.save({n: p.grad for n, p in params}, out)
if ddp:
    torch.distributed.destroy_process_group()
