"""The seed article's 2-2-2 sigmoid network, computed exactly with nnbackprop's hand-written backward.

Prints each value beside the one the article ("Mechanics of Deep Learning") reports, and explains the differences:
the article rounds intermediate values before reusing them, and its update adds the gradient (climbing the error)
where gradient descent subtracts it.

    python experiments/seed_worked_example.py
"""

import torch

from nnbackprop import check_gradients
from nnbackprop.losses import MSELoss
from nnbackprop.worked_example import ARTICLE, INPUT, LEARNING_RATE, TARGET, run_worked_example, seed_network

result = run_worked_example()
rows = [
    ("H1 = σ(w1·x1 + w2·x2 + b1)", result.H1, ARTICLE["H1"]),
    ("H2 = σ(w3·x1 + w4·x2 + b1)", result.H2, ARTICLE["H2"]),
    ("Y1 = σ(w5·H1 + w6·H2 + b2)", result.Y1, ARTICLE["Y1"]),
    ("Y2 = σ(w7·H1 + w8·H2 + b2)", result.Y2, ARTICLE["Y2"]),
    ("E = ½ Σ (t − o)²", result.E, ARTICLE["E"]),
    ("∂E/∂w5", result.dE_dw5, ARTICLE["dE/dw5"]),
    (f"w5 after one step, lr {LEARNING_RATE}", result.w5_after, ARTICLE["w5 after"]),
]
print(f"2-2-2 sigmoid network, input {list(INPUT)}, target {list(TARGET)}, float64\n")
print(f"{'quantity':<34} {'nnbackprop':>12} {'article':>12}")
for name, ours, article in rows:
    print(f"{name:<34} {ours:>12.6f} {article:>12.7g}")

print("\nall gradients (hand-written backward):")
for name, grad in result.grads.items():
    print(f"  ∂E/∂{name:<9} {[round(v, 6) for v in grad.flatten().tolist()]}")

print("\nwhy the last columns differ:")
print("  - The article rounds H1 to 0.538 and Y1 to 0.63368 before multiplying, which gives E = 0.184972 and")
print(f"    ∂E/∂w5 = 0.58368 · 0.23213 · 0.538 = 0.07289; carried at full precision they are {result.E:.6f} and "
      f"{result.dE_dw5:.6f}.")
print("  - The article updates w5 + α·∂E/∂w5 = 0.1807289, a step *up* the error. Gradient descent steps down:")
print(f"    w5 − α·∂E/∂w5 = 0.18 − {LEARNING_RATE} · {result.dE_dw5:.6f} = {result.w5_after:.6f}.")

net = seed_network()
report = check_gradients(net, torch.tensor([INPUT], dtype=torch.float64))
loss_report = check_gradients(MSELoss("half_sum"), net(torch.tensor([INPUT], dtype=torch.float64)),
                              torch.tensor([TARGET], dtype=torch.float64))
print(f"\nagreement with torch.autograd (float64): network max relative error {report.max_rel_err:.1e}, "
      f"loss {loss_report.max_rel_err:.1e} -> {'ok' if report.passed and loss_report.passed else 'FAIL'}")
