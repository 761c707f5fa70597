"""Which Hessian do train-mode estimates track on the digits CNN with BatchNorm? (docs/tracking)

Trains the tracking bench's digits CNN with SAM (batch 64), and at a few steps computes the top
eigenvector of the eval-mode Hessian on the 1,024-image batch (the reference of the frontier's
quality) and of the train-mode / eval-mode Hessians on 64-image batches and on the 1,024 batch
(train mode: BatchNorm on batch statistics, running statistics frozen). Prints |cos| with the
reference and the reference's Rayleigh quotient of each over its lambda_max.
"""
import torch
from xsam.bench.tracking_bench import make_task
from xsam.diagnostics import top_eigenvalue
from xsam.optim import SAM, batchnorm_statistics_frozen

torch.set_num_threads(2)
def flat(vs):
    return torch.cat([v.reshape(-1) for v in vs])
def rq(model, loss_fn, v):
    from xsam.hessian import exact_hvp
    from xsam.optim import eval_mode
    params = [p for p in model.parameters() if p.requires_grad]
    with eval_mode(model):
        hvp, _ = exact_hvp(loss_fn, params)
        hv = hvp([v])[0]
    return float(flat(hv) @ flat(v) / (flat(v) @ flat(v)))

for seed in (0, 1):
    task = make_task("digits", seed)
    model, x, y = task.model, task.x, task.y
    bx, by = task.big
    lf = task.loss
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=task.lr, momentum=0.9, weight_decay=task.weight_decay,
              model=model)
    gen = torch.Generator().manual_seed(seed)
    step = 0
    for checkpoint in (50, 300):
        while step < checkpoint:
            idx = torch.randint(0, len(x), (64,), generator=gen)
            def closure():
                loss = lf(model(x[idx]), y[idx]); loss.backward(); return loss
            opt.step(closure); step += 1
        big = lambda: lf(model(bx), by)
        ref = top_eigenvalue(model, big, tol=1e-4, max_iters=300)
        vref = flat(ref.vector)
        rows = []
        for name, batch_fn, ev in [("eval, 1024", big, True), ("train, 1024", big, False)] + [
                (f"{mode}, 64 #{k}", (lambda i=i: lf(model(x[i]), y[i])), mode == "eval")
                for k, i in enumerate(torch.randint(0, len(x), (3, 64), generator=torch.Generator().manual_seed(99)))
                for mode in ("eval", "train")]:
            with batchnorm_statistics_frozen(model):
                est = top_eigenvalue(model, batch_fn, tol=1e-4, max_iters=300, eval_mode=ev)
            v = est.vector
            cos = abs(float(flat(v) @ vref / (flat(v).norm() * vref.norm())))
            rows.append(f"  {name:14s} lambda {est.eigenvalue:9.3f}  |cos(v, v_ref)| {cos:.3f}  RQ_ref(v)/lambda_ref {rq(model, big, v) / ref.eigenvalue:.3f}")
        print(f"seed {seed}, step {step}: reference (eval, 1024) lambda_max {ref.eigenvalue:.3f}")
        print("\n".join(rows))
