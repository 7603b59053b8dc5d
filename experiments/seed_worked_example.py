"""The seed article's 2-2-2 sigmoid network ("Mechanics of Deep Learning"), computed exactly with nnbackprop's
hand-written backward.

Two inputs, two sigmoid hidden units ``H1, H2``, two sigmoid outputs ``Y1, Y2``, and the error
``E = ½ Σ (t − o)²``. The article names the weights ``w1…w8`` row by row:
``H1 = σ(w1 x1 + w2 x2 + b1)``, ``H2 = σ(w3 x1 + w4 x2 + b1)``, ``Y1 = σ(w5 H1 + w6 H2 + b2)``,
``Y2 = σ(w7 H1 + w8 H2 + b2)``, so ``w5`` is ``weight[0, 0]`` of the second ``Linear``.

Prints each value beside the one the article reports, and explains the differences: the article rounds intermediate
values before reusing them, and its update adds the gradient (climbing the error) where gradient descent subtracts it.

    python experiments/seed_worked_example.py
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nnbackprop import Linear, MSELoss, Sequential, Sigmoid, check_gradients

WEIGHTS = (0.10, 0.15, 0.03, 0.08, 0.18, 0.06, 0.11, 0.26)
HIDDEN_BIAS = 0.05
OUTPUT_BIAS = 0.42
INPUT = (0.95, 0.06)
TARGET = (0.05, 0.82)
LEARNING_RATE = 0.01

# What the article prints; it rounds intermediate values (H1 = 0.538, H2 = 0.52, ...) before using them.
ARTICLE = {"H1": 0.538, "H2": 0.52, "Y1": 0.633, "Y2": 0.648, "E": 0.184972, "dE/dw5": 0.07289, "w5 after": 0.1807289}


def seed_network(dtype: torch.dtype = torch.float64) -> Sequential:
    """The article's network with its initial weights: ``Linear(2, 2) → Sigmoid → Linear(2, 2) → Sigmoid``."""
    net = Sequential(Linear(2, 2, dtype=dtype), Sigmoid(), Linear(2, 2, dtype=dtype), Sigmoid())
    w = torch.tensor(WEIGHTS, dtype=dtype)
    with torch.no_grad():
        net[0].weight.copy_(w[:4].reshape(2, 2))
        net[0].bias.fill_(HIDDEN_BIAS)
        net[2].weight.copy_(w[4:].reshape(2, 2))
        net[2].bias.fill_(OUTPUT_BIAS)
    return net


@dataclass
class WorkedExample:
    """Exact values of the forward pass, the error, ``∂E/∂w5`` and ``w5`` after one gradient-descent step."""

    H1: float
    H2: float
    Y1: float
    Y2: float
    E: float
    dE_dw5: float
    w5_after: float
    grads: dict[str, torch.Tensor]


def run_worked_example(lr: float = LEARNING_RATE) -> WorkedExample:
    """Forward, ``E = ½ Σ (t − o)²``, hand-written backward, and one step ``w ← w − lr · ∂E/∂w``, in float64."""
    net = seed_network()
    loss_fn = MSELoss("half_sum")
    x = torch.tensor([INPUT], dtype=torch.float64)  # (1, 2)
    t = torch.tensor([TARGET], dtype=torch.float64)  # (1, 2)
    seen = {}
    net[1].register_forward_hook(lambda module, inputs, output: seen.update(hidden=output.clone()))  # H1, H2
    out = net(x)
    hidden = seen["hidden"]
    loss = loss_fn(out, t)
    net.backward(loss_fn.backward())
    grads = {name: p.grad.clone() for name, p in net.named_parameters()}
    dE_dw5 = grads["2.weight"][0, 0].item()
    with torch.no_grad():
        for p in net.parameters():
            p.sub_(lr * p.grad)
    return WorkedExample(
        H1=hidden[0, 0].item(), H2=hidden[0, 1].item(), Y1=out[0, 0].item(), Y2=out[0, 1].item(),
        E=loss.item(), dE_dw5=dE_dw5, w5_after=net[2].weight[0, 0].item(), grads=grads,
    )


def main() -> None:
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


if __name__ == "__main__":
    main()
