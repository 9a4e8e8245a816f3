"""Pilot behind docs/results.md section 15 (allocation): prune the dense Sunnybrook U-Net with the
uniform allocation (floor 2 at 256x, floor 3 at 1000x) and the global cost-aware ranking (floor 1,
256x), then fine-tune in three blocks of 100 steps (each its own cosine schedule; Adam 2e-3, 5e-3 for
the 1000x run, batch 4), printing the
test Dice after each block.

    PYTHONPATH=src OMP_NUM_THREADS=1 nice -n 10 python benchmarks/pruning_allocation_pilot.py [weights]
"""
import time, torch, sys
from winoq.pruning import load_unet, PruneConfig, prune_unet, TrainConfig, evaluate
from winoq.data.segmentation import load_segmentation
torch.set_num_threads(1)
d, info = load_unet(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/weights/unet_sunnybrook.safetensors")
tr = load_segmentation("sunnybrook","train",size=128,crop=128); te=load_segmentation("sunnybrook","test",size=128,crop=128)
ex = torch.zeros(1,1,128,128)
print("dense", evaluate(d,te)["dice"], flush=True)
for r, alloc, f, lr in [(256,"uniform",2,2e-3),(256,"global",1,2e-3),(1000,"uniform",3,5e-3)]:
    t=time.time()
    res=prune_unet(d, PruneConfig(target_ratio=r, min_filters=f, allocation=alloc), tr, example=ex, progress=False)
    print(r, alloc, f, "no ft", evaluate(res.model,te)["dice"], flush=True)
    m = res.model
    for k in range(3):
        from winoq.pruning import train
        train(m, tr, TrainConfig(steps=100, batch_size=4, lr=lr, seed=k), progress=False)
        print("  ", r, alloc, f, lr, (k+1)*100, round(evaluate(m,te)["dice"],4), round(time.time()-t,1), flush=True)
