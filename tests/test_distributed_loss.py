"""VICReg under torch.distributed: two gloo processes on CPU against one process on the whole batch.

Semantics (losses.py): invariance on the local batch, variance/covariance on every rank's
embeddings gathered with gradient. Then (a) the mean over ranks of the rank losses equals the
single-process loss on the concatenated batch, and (b) each rank's gradient of its own loss with
respect to its local z, divided by the world size (DDP's gradient averaging), equals the
single-process gradient rows of that rank.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from sjea_tools import stacked_vicreg_loss, vicreg_loss

WORLD = 2
N_LOCAL, DIMS = 6, (5, 3)  # two levels of embedding sizes

# Run as a separate interpreter so the test does not depend on how pytest imports test modules.
WORKER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    import torch.distributed as dist
    from sjea_tools import stacked_vicreg_loss, vicreg_loss

    rank, world, init_file, data_file, out_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    data = np.load(data_file)
    n = data["z1_0"].shape[0] // world
    rows = slice(rank * n, (rank + 1) * n)
    out = {}

    # one level, official coefficients
    z1 = torch.tensor(data["z1_0"][rows], requires_grad=True)
    z2 = torch.tensor(data["z2_0"][rows], requires_grad=True)
    terms = vicreg_loss(z1, z2)
    terms.total.backward()
    out.update(loss=terms.total.item(), inv=terms.invariance.item(), var=terms.variance.item(),
               cov=terms.covariance.item(), g1=z1.grad.numpy(), g2=z2.grad.numpy())

    # two levels, custom per-level coefficients and weights
    z1s = [torch.tensor(data[f"z1_{k}"][rows], requires_grad=True) for k in range(2)]
    z2s = [torch.tensor(data[f"z2_{k}"][rows], requires_grad=True) for k in range(2)]
    total, _ = stacked_vicreg_loss(z1s, z2s, [25.0, 4.0], [25.0, 10.0], [1.0, 0.2], [1.0, 0.5])
    total.backward()
    out["stacked"] = total.item()
    for k in range(2):
        out[f"s_g1_{k}"] = z1s[k].grad.numpy()
        out[f"s_g2_{k}"] = z2s[k].grad.numpy()

    # gather=False keeps everything local
    a = torch.tensor(data["z1_0"][rows]); b = torch.tensor(data["z2_0"][rows])
    out["local"] = vicreg_loss(a, b, gather=False).total.item()
    np.savez(out_file, **out)
    dist.destroy_process_group()
    """
)


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    rng = np.random.default_rng(0)
    data = {}
    for k, d in enumerate(DIMS):
        base = rng.normal(size=(WORLD * N_LOCAL, d)) * np.linspace(0.3, 1.8, d)
        data[f"z1_{k}"] = base.astype(np.float32)
        data[f"z2_{k}"] = (base + 0.4 * rng.normal(size=base.shape)).astype(np.float32)
    np.savez(tmp / "data.npz", **data)
    script = tmp / "worker.py"
    script.write_text(WORKER)
    procs = [
        subprocess.Popen([sys.executable, str(script), str(r), str(WORLD), str(tmp / "init"), str(tmp / "data.npz"),
                          str(tmp / f"rank{r}.npz")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(WORLD)
    ]
    logs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        logs.append(out)
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log
    ranks = [dict(np.load(tmp / f"rank{r}.npz")) for r in range(WORLD)]
    return data, ranks


def test_mean_of_rank_losses_equals_single_process_loss(two_rank_results):
    data, ranks = two_rank_results
    full = vicreg_loss(torch.tensor(data["z1_0"]), torch.tensor(data["z2_0"]))
    mean_loss = np.mean([float(r["loss"]) for r in ranks])
    assert mean_loss == pytest.approx(full.total.item(), rel=1e-5)
    # variance and covariance see the gathered batch: identical on every rank and to one process
    for r in ranks:
        assert float(r["var"]) == pytest.approx(full.variance.item(), rel=1e-5)
        assert float(r["cov"]) == pytest.approx(full.covariance.item(), rel=1e-5)
    # invariance is local: the ranks differ, their mean is the global one
    assert float(ranks[0]["inv"]) != pytest.approx(float(ranks[1]["inv"]), rel=1e-3)
    assert np.mean([float(r["inv"]) for r in ranks]) == pytest.approx(full.invariance.item(), rel=1e-5)


def test_rank_gradients_over_world_size_equal_single_process_rows(two_rank_results):
    data, ranks = two_rank_results
    z1 = torch.tensor(data["z1_0"], requires_grad=True)
    z2 = torch.tensor(data["z2_0"], requires_grad=True)
    vicreg_loss(z1, z2).total.backward()
    for r, out in enumerate(ranks):
        rows = slice(r * N_LOCAL, (r + 1) * N_LOCAL)
        np.testing.assert_allclose(out["g1"] / WORLD, z1.grad[rows].numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(out["g2"] / WORLD, z2.grad[rows].numpy(), rtol=1e-4, atol=1e-6)
    assert np.abs(z1.grad.numpy()).sum() > 0


def test_stacked_loss_distributed_equals_single_process(two_rank_results):
    data, ranks = two_rank_results
    z1s = [torch.tensor(data[f"z1_{k}"], requires_grad=True) for k in range(2)]
    z2s = [torch.tensor(data[f"z2_{k}"], requires_grad=True) for k in range(2)]
    total, _ = stacked_vicreg_loss(z1s, z2s, [25.0, 4.0], [25.0, 10.0], [1.0, 0.2], [1.0, 0.5])
    total.backward()
    assert np.mean([float(r["stacked"]) for r in ranks]) == pytest.approx(total.item(), rel=1e-5)
    for r, out in enumerate(ranks):
        rows = slice(r * N_LOCAL, (r + 1) * N_LOCAL)
        for k in range(2):
            np.testing.assert_allclose(out[f"s_g1_{k}"] / WORLD, z1s[k].grad[rows].numpy(), rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(out[f"s_g2_{k}"] / WORLD, z2s[k].grad[rows].numpy(), rtol=1e-4, atol=1e-6)


def test_gather_false_uses_only_the_local_batch(two_rank_results):
    data, ranks = two_rank_results
    for r, out in enumerate(ranks):
        rows = slice(r * N_LOCAL, (r + 1) * N_LOCAL)
        local = vicreg_loss(torch.tensor(data["z1_0"][rows]), torch.tensor(data["z2_0"][rows]))
        assert float(out["local"]) == pytest.approx(local.total.item(), rel=1e-6)
        assert float(out["local"]) != pytest.approx(float(out["loss"]), rel=1e-3)
