"""render.py: the vectorised rasteriser against a per-pixel, per-face loop, on two boxes that
occlude each other seen from an oblique camera."""
import numpy as np
import torch

import render


def slow_render(verts_view, dist, faces, face_rgb, size, margin=0.08):
    """Per-pixel, per-face reference of render.render for one image (float64, loops)."""
    V = verts_view.astype(np.float64)
    depth = dist - V[:, 2]
    u, v = V[:, 0] / depth, V[:, 1] / depth
    span = max(u.max() - u.min(), v.max() - v.min())
    scale = (1 - 2 * margin) * size / span
    px = (u - (u.max() + u.min()) / 2) * scale + size / 2
    py = size / 2 - (v - (v.max() + v.min()) / 2) * scale
    light = render.LIGHT.double().numpy()
    img = np.tile(np.array(render.BACKGROUND), (size, size, 1))
    best = np.full((size, size), -1.0)
    for f, (a, b, c) in enumerate(faces):
        n = np.cross(V[b] - V[a], V[c] - V[a])
        if n @ (np.array([0, 0, dist]) - (V[a] + V[b] + V[c]) / 3) <= 0:
            continue  # back face
        shade = 0.35 + 0.65 * max(0.0, n / np.linalg.norm(n) @ light)
        A = np.array([[px[a], px[b], px[c]], [py[a], py[b], py[c]], [1, 1, 1]])
        for y in range(size):
            for x in range(size):
                try:
                    w = np.linalg.solve(A, [x + 0.5, y + 0.5, 1])  # barycentric weights
                except np.linalg.LinAlgError:
                    continue
                if (w >= 0).all():
                    z = w @ (1 / depth[[a, b, c]])
                    if z > best[y, x]:
                        best[y, x], img[y, x] = z, face_rgb[f] * shade
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def test_renderer_matches_slow_reference():
    g = torch.Generator().manual_seed(0)
    # Two overlapping boxes at different depths: occlusion, culling and shading all matter.
    cube = torch.tensor([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=torch.float32)
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    tris = [(q[0], q[1], q[2]) for q in quads] + [(q[0], q[2], q[3]) for q in quads]
    # the later faces lie behind
    verts = torch.cat([cube * torch.tensor([0.3, 0.5, 0.2]), cube * 0.25 + torch.tensor([0.2, 0.1, -0.4])])
    faces = torch.tensor(tris + [(a + 8, b + 8, c + 8) for a, b, c in tris])
    rgb = torch.rand(len(faces), 3, generator=g)
    R = render.view_rotation(torch.tensor([0.5]), torch.tensor([0.3]))
    vv = verts[None] @ R.transpose(1, 2)
    fast = render.render(vv, torch.tensor([3.0]), faces, rgb, size=24)[0].numpy()
    slow = slow_render(vv[0].numpy(), 3.0, faces.numpy(), rgb.double().numpy(), 24)
    differ = np.abs(fast.astype(int) - slow.astype(int)).max(-1) > 1
    assert differ.mean() < 0.01  # only pixels exactly on a shared edge may fall either way
