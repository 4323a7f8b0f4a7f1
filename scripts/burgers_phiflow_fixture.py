#!/usr/bin/env python3
"""Known answers for `Burgers2d::step` from an independent implementation, PhiFlow 3.4.

Re-run (from the repository root; needs Python 3 with numpy):

    pip install phiflow==3.4.0
    python3 scripts/burgers_phiflow_fixture.py

It rewrites deepzero-pde/tests/fixtures/burgers_phiflow/ (params.json and raw little-endian f64
files), which `cargo test --release -p deepzero-pde --test known_answers` compares with.

The step is the one of deepzero-pde/src/burgers.rs, written with PhiFlow's operators on a
periodic CenteredGrid over [0, L)^2:

1. `advect.semi_lagrangian(velocity, velocity, dt)`: departure points x - dt*u(x), linear
   (bilinear) interpolation between cell centres;
2. `diffuse.fourier(velocity, nu / dx**2, dt)`: PhiFlow 3.4's Fourier diffusion takes its
   frequencies from `math.fftfreq(resolution)` with the default dx = 1, i.e. in cycles per *cell*,
   so the kernel is exp(-4 pi^2 |k_cell|^2 * diffusivity * dt). The physical kernel is
   exp(-4 pi^2 |k|^2 nu dt / L^2) with k in cycles per domain, k_cell = k / n, so the diffusivity
   passed is nu * n^2 / L^2 = nu / dx^2 (checked below against a single mode);
3. `+ dt * f(t)` with t = step * dt, f evaluated directly at the cell centres with numpy.

Fields are sums of waves a_c * sin(2 pi (kx x + ky y) / L + phase - omega t) (deepzero's
`WaveField`), sampled at the cell centres ((j + 1/2) dx, (i + 1/2) dx). Files are written in
deepzero's layout [2, n, n]: channel 0 = u (the x component), channel 1 = v, each row-major
[y, x] (row i is y, column j is x). PhiFlow stores values as (x, y, vector=x,y), hence the
transposes below.
"""

import json
import os

import numpy as np
import phi
from phi import math
from phi.flow import Box, CenteredGrid, advect, diffuse, extrapolation
from phi.math import channel, spatial

assert phi.__version__ == "3.4.0", f"this fixture was made with PhiFlow 3.4.0, found {phi.__version__}"
math.set_global_precision(64)

OUT = os.path.join(os.path.dirname(__file__), "..", "deepzero-pde", "tests", "fixtures", "burgers_phiflow")

L = 32.0
DT = 0.1
NU = 0.1
SIZES = [32, 128]
STEPS = [1, 20]

# (kx, ky, amplitudes (u, v), phase, angular frequency); the Rust test builds the same waves.
INITIAL = [
    (1, 0, (1.5, 0.3), 0.4, 0.0),
    (0, 1, (-0.5, 0.8), 1.1, 0.0),
    (2, -1, (0.4, -0.6), 2.3, 0.0),
    (-1, 3, (0.25, 0.35), -0.7, 0.0),
    (3, 2, (-0.2, 0.15), 5.0, 0.0),
]
FORCING = [
    (1, 1, (0.15, -0.1), 0.2, 0.4),
    (-2, 1, (-0.12, 0.08), 1.7, -0.3),
    (0, 3, (0.1, 0.05), 3.1, 0.25),
    (4, 0, (0.05, -0.13), -1.2, 0.1),
]


def cell_centres(n):
    """x[i, j], y[i, j] at cell (row i, column j), deepzero's [y, x] layout."""
    centres = (np.arange(n) + 0.5) * (L / n)
    y, x = np.meshgrid(centres, centres, indexing="ij")
    return x, y


def waves_at(waves, n, t):
    """The field [2, n, n] of `waves` at time t, evaluated pointwise."""
    x, y = cell_centres(n)
    field = np.zeros((2, n, n))
    for kx, ky, amplitudes, phase, omega in waves:
        argument = 2 * np.pi * (kx * x + ky * y) / L + phase - omega * t
        for c in range(2):
            field[c] += amplitudes[c] * np.sin(argument)
    return field


def to_grid(field):
    """deepzero [2, n, n] ([c, y, x]) to a periodic PhiFlow CenteredGrid with vector (x, y)."""
    n = field.shape[1]
    values = math.tensor(np.stack([field[0].T, field[1].T], axis=-1), spatial("x,y"), channel(vector="x,y"))
    return CenteredGrid(values, extrapolation.PERIODIC, bounds=Box(x=L, y=L), x=n, y=n)


def from_grid(grid):
    """PhiFlow CenteredGrid (x, y, vector) back to deepzero [2, n, n]."""
    u = grid.values.vector["x"].numpy("y,x")
    v = grid.values.vector["y"].numpy("y,x")
    return np.stack([u, v])


def step(grid, step_index, dx):
    grid = advect.semi_lagrangian(grid, grid, DT)
    grid = diffuse.fourier(grid, NU / dx**2, DT)
    forcing = waves_at(FORCING, grid.resolution.get_size("x"), step_index * DT)
    return grid.with_values(grid.values + DT * to_grid(forcing).values)


def check_diffusion_convention(n):
    """PhiFlow's Fourier diffusion with nu / dx^2 decays mode k by exp(-4 pi^2 |k|^2 nu dt / L^2)."""
    dx = L / n
    kx, ky = 3, -2
    x, y = cell_centres(n)
    mode = np.cos(2 * np.pi * (kx * x + ky * y) / L + 0.3)
    diffused = from_grid(diffuse.fourier(to_grid(np.stack([mode, 2 * mode])), NU / dx**2, DT))
    factor = np.exp(-4 * np.pi**2 * (kx**2 + ky**2) * NU * DT / L**2)
    error = np.max(np.abs(diffused - factor * np.stack([mode, 2 * mode])))
    assert error < 1e-13, f"diffusion convention at n = {n}: error {error}"


def write(name, field):
    assert field.dtype == np.float64 and field.ndim == 3 and field.shape[0] == 2
    field.astype("<f8").tofile(os.path.join(OUT, name))


def main():
    os.makedirs(OUT, exist_ok=True)
    files = {}
    for n in SIZES:
        check_diffusion_convention(n)
        dx = L / n
        state = waves_at(INITIAL, n, 0.0)
        grid = to_grid(state)
        assert np.array_equal(from_grid(grid), state), "layout round trip"
        if n == SIZES[0]:
            name = f"n{n}_initial.f64"
            write(name, state)
            files[name] = {"size": n, "steps": 0}
        for s in range(max(STEPS)):
            grid = step(grid, s, dx)
            if s + 1 in STEPS:
                name = f"n{n}_step{s + 1}.f64"
                write(name, from_grid(grid))
                files[name] = {"size": n, "steps": s + 1}
    as_waves = lambda waves: [
        {"kx": kx, "ky": ky, "amplitudes": list(a), "phase": p, "angular_frequency": w}
        for kx, ky, a, p, w in waves
    ]
    params = {
        "generator": "scripts/burgers_phiflow_fixture.py",
        "phiflow": phi.__version__,
        "numpy": np.__version__,
        "domain_length": L,
        "dt": DT,
        "viscosity": NU,
        "layout": "little-endian f64 [2, n, n]: channel 0 = u (x), 1 = v (y); rows y, columns x",
        "initial": {"channels": 2, "waves": as_waves(INITIAL)},
        "forcing": {"channels": 2, "waves": as_waves(FORCING)},
        "files": files,
    }
    with open(os.path.join(OUT, "params.json"), "w") as f:
        json.dump(params, f, indent=2)
        f.write("\n")
    print(f"wrote {sorted(files)} to {os.path.normpath(OUT)}")


if __name__ == "__main__":
    main()
