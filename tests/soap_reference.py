"""A float64 numpy transcription of the released SOAP step, the oracle of test_soap.

The rule of `SOAP.step` in github.com/nikhilvyas/SOAP, soap.py on `main` at commit a1e5535,
with its defaults precondition_1d=False, merge_dims=False, normalize_grads=False,
correct_bias=True, written here for one parameter at a time (the PyTorch code loops over
parameters the same way). Written from reading that code, not copied.
"""
import numpy as np


def _eigenbasis(stat):
    """Eigenvectors of a symmetric matrix, columns by decreasing eigenvalue (eigh, flipped)."""
    return np.linalg.eigh(stat)[1][:, ::-1]


class ReferenceSoap:
    """`ReferenceSoap(...).step(param, grad)` returns the new param, as `SOAP.step` would.

    `first_basis(dim, stat)` computes the basis of the first statistic of dim `dim`
    (default: eigh). A rank-deficient statistic (a (32, 48) gradient's 48 x 48 G^T G has a
    16-dim null space) has no unique eigenbasis, and any orthonormal basis of the null space
    is as correct as another; a test comparing two implementations passes the other one's
    choice here after checking that it is an eigenbasis of this statistic.
    """

    def __init__(self, lr=3e-3, betas=(0.95, 0.95), shampoo_beta=-1, eps=1e-8,
                 weight_decay=0.01, precondition_frequency=10, max_precond_dim=10000,
                 first_basis=None):
        self.lr, (self.b1, self.b2), self.eps = lr, betas, eps
        self.shampoo_beta = shampoo_beta if shampoo_beta >= 0 else betas[1]
        self.weight_decay, self.frequency = weight_decay, precondition_frequency
        self.max_precond_dim = max_precond_dim
        self.first_basis = first_basis or (lambda _, stat: _eigenbasis(stat))
        self.state = None

    def _project(self, x, back=False):
        # Contracts dim 0 with each basis in turn and appends the result last, so after
        # every dim the order is restored (a dim without a basis is only moved to the end).
        for q in self.state["Q"]:
            if q is None:
                x = np.moveaxis(x, 0, -1)
            else:
                x = np.tensordot(x, q, axes=([0], [1 if back else 0]))
        return x

    def _update_preconditioner(self, grad):
        state = self.state
        if state["Q"] is not None:
            state["exp_avg"] = self._project(state["exp_avg"], back=True)
        for dim, stat in enumerate(state["GG"]):
            if stat is not None:
                others = [d for d in range(grad.ndim) if d != dim]
                outer = np.tensordot(grad, grad, axes=(others, others))
                state["GG"][dim] = stat + (1 - self.shampoo_beta) * (outer - stat)  # lerp
        if state["Q"] is None:
            state["Q"] = [None if s is None else self.first_basis(dim, s)
                          for dim, s in enumerate(state["GG"])]
        if state["step"] > 0 and state["step"] % self.frequency == 0:
            state["Q"] = self._power_step()
        if state["step"] > 0:
            state["exp_avg"] = self._project(state["exp_avg"])

    def _power_step(self):
        state = self.state
        bases = []
        for dim, (stat, q) in enumerate(zip(state["GG"], state["Q"])):
            if stat is None:
                bases.append(None)
                continue
            order = np.argsort(-np.diag(q.T @ stat @ q), kind="stable")
            state["exp_avg_sq"] = np.take(state["exp_avg_sq"], order, axis=dim)
            bases.append(np.linalg.qr(stat @ q[:, order])[0])
        return bases

    def step(self, param, grad):
        param, grad = np.asarray(param, np.float64), np.asarray(grad, np.float64)
        if self.state is None:
            precondition = grad.ndim >= 2
            self.state = {
                "step": 0, "exp_avg": np.zeros_like(grad), "exp_avg_sq": np.zeros_like(grad),
                "GG": [np.zeros((d, d)) if precondition and d <= self.max_precond_dim else None
                       for d in grad.shape],
                "Q": None}
            self._update_preconditioner(grad)
            return param  # the first gradient only initialises the statistics and bases
        state = self.state
        projected = self._project(grad)
        state["step"] += 1
        state["exp_avg"] = self.b1 * state["exp_avg"] + (1 - self.b1) * projected
        state["exp_avg_sq"] = self.b2 * state["exp_avg_sq"] + (1 - self.b2) * projected ** 2
        denom = np.sqrt(state["exp_avg_sq"]) + self.eps
        step_size = (self.lr * np.sqrt(1 - self.b2 ** state["step"])
                     / (1 - self.b1 ** state["step"]))
        param = param - step_size * self._project(state["exp_avg"] / denom, back=True)
        if self.weight_decay > 0:
            param = param - self.lr * self.weight_decay * param
        self._update_preconditioner(grad)
        return param
