"""The camera and the mesh renderer of the built-in benchmark (posebench.py) and the report's figures.

A pinhole camera orbits the pelvis (`view_rotation`); `render` rasterises posed meshes in the
camera's view frame to small RGB images: z-buffered, flat shaded, back faces culled, the person
cropped as a detector would, with no Python loop over triangles. `face_colours` paints the body as
the benchmark shows it: left limbs blue, right limbs orange, the midline grey, so that an image
tells left from right (and front from back). tests/test_render.py checks `render` against a
per-pixel, per-face loop.
"""
from __future__ import annotations

import torch

import body


def view_rotation(yaw_rad: torch.Tensor, elev_rad: torch.Tensor) -> torch.Tensor:
    """World -> view rotations (N, 3, 3) for a camera orbiting the pelvis.

    The camera sits at distance d along z_view = (sin(yaw) cos(elev), sin(elev), cos(yaw) cos(elev))
    and looks at the pelvis; view frame: x to the image's right, y up, z towards the camera.
    """
    z = torch.stack([torch.sin(yaw_rad) * torch.cos(elev_rad), torch.sin(elev_rad),
                     torch.cos(yaw_rad) * torch.cos(elev_rad)], -1)
    up = torch.tensor([0.0, 1.0, 0.0], dtype=z.dtype).expand_as(z)
    x = torch.nn.functional.normalize(torch.cross(up, z, dim=-1), dim=-1)
    y = torch.cross(z, x, dim=-1)
    return torch.stack([x, y, z], dim=-2)  # rows: the view axes in world coordinates


PALETTE = torch.tensor([[0.80, 0.80, 0.78],   # midline (torso, head)
                        [0.25, 0.45, 0.95],   # left limbs: blue
                        [0.95, 0.45, 0.20]])  # right limbs: orange
BACKGROUND = (0.10, 0.10, 0.12)
LIGHT = torch.nn.functional.normalize(torch.tensor([0.4, 0.6, 1.0]), dim=0)


def render(verts_view: torch.Tensor, distance_m: torch.Tensor, faces: torch.Tensor, face_rgb: torch.Tensor,
           size: int = 64, supersample: int = 1, margin: float = 0.08) -> torch.Tensor:
    """Rasterise meshes seen by a pinhole camera at (0, 0, d) looking along -z of the view frame.

    The person is cropped as a detector would: the projected 2D box is centred and scaled to
    fill the image (aspect kept). Flat shading, back faces culled, z-buffer on inverse depth
    (which is linear in screen space). All pixel-triangle pairs of the batch are enumerated at
    once from each triangle's bounding box, so there is no Python loop over triangles.

    Args:
        verts_view: (B, V, 3) vertices in the view frame, metres, pelvis at the origin.
        distance_m: (B,) camera distance from the pelvis.
        faces: (F, 3) vertex indices, outward winding. face_rgb: (F, 3) colours in [0, 1].
    Returns:
        (B, size, size, 3) uint8 images.
    """
    B = verts_view.shape[0]
    H = W = size * supersample
    depth = distance_m[:, None] - verts_view[..., 2]  # (B, V)
    if (depth <= 0.05).any():
        raise ValueError("render: a vertex is behind or at the camera; increase the camera distance")
    u, v = verts_view[..., 0] / depth, verts_view[..., 1] / depth  # (B, V) image plane, focal 1
    span = torch.maximum(u.amax(1) - u.amin(1), v.amax(1) - v.amin(1))
    scale = (1 - 2 * margin) * W / span  # (B,)
    px = (u - (u.amax(1) + u.amin(1))[:, None] / 2) * scale[:, None] + W / 2
    py = H / 2 - (v - (v.amax(1) + v.amin(1))[:, None] / 2) * scale[:, None]  # rows grow downwards

    X = verts_view[:, faces]  # (B, F, 3, 3)
    normal = torch.cross(X[:, :, 1] - X[:, :, 0], X[:, :, 2] - X[:, :, 0], dim=-1)
    to_cam = torch.zeros_like(X[:, :, 0])
    to_cam[..., 2] = distance_m[:, None]
    to_cam = to_cam - X.mean(2)
    front = (normal * to_cam).sum(-1) > 0  # (B, F) back faces culled
    shade = 0.35 + 0.65 * (torch.nn.functional.normalize(normal, dim=-1) @ LIGHT).clamp_min(0)  # (B, F)

    b_idx, f_idx = front.nonzero(as_tuple=True)  # the M front faces of the batch
    P = torch.stack([px, py], -1)[b_idx[:, None], faces[f_idx]]  # (M, 3, 2) screen corners
    iz = (1.0 / depth)[b_idx[:, None], faces[f_idx]]  # (M, 3) inverse depth
    x0 = torch.ceil(P[..., 0].amin(1) - 0.5).clamp(0, W - 1).long()
    x1 = torch.floor(P[..., 0].amax(1) - 0.5).clamp(-1, W - 1).long()
    y0 = torch.ceil(P[..., 1].amin(1) - 0.5).clamp(0, H - 1).long()
    y1 = torch.floor(P[..., 1].amax(1) - 0.5).clamp(-1, H - 1).long()
    w, h = (x1 - x0 + 1).clamp_min(0), (y1 - y0 + 1).clamp_min(0)
    count = w * h  # pixel centres in each face's bounding box
    tri = torch.repeat_interleave(torch.arange(len(count)), count)  # (Q,) face of each pair
    k = torch.arange(len(tri)) - (torch.cumsum(count, 0) - count)[tri]
    qx = (x0[tri] + k % w[tri]).float() + 0.5
    qy = (y0[tri] + k // w[tri]).float() + 0.5
    a, b, c = P[tri, 0], P[tri, 1], P[tri, 2]

    def edge(p0, p1, x, y):  # twice the signed area of (p0, p1, (x, y))
        return (p1[:, 0] - p0[:, 0]) * (y - p0[:, 1]) - (p1[:, 1] - p0[:, 1]) * (x - p0[:, 0])

    area = edge(a, b, c[:, 0], c[:, 1])
    area = torch.where(area.abs() < 1e-12, torch.full_like(area, float("nan")), area)  # degenerate: never inside
    w0, w1 = edge(b, c, qx, qy) / area, edge(c, a, qx, qy) / area
    w2 = 1 - w0 - w1
    inside = (w0 >= 0) & (w1 >= 0) & (w2 >= 0)
    tri, w0, w1, w2 = tri[inside], w0[inside], w1[inside], w2[inside]
    z = w0 * iz[tri, 0] + w1 * iz[tri, 1] + w2 * iz[tri, 2]
    pix = b_idx[tri] * (H * W) + qy[inside].long() * W + qx[inside].long()
    zbuf = torch.full((B * H * W,), -1.0).scatter_reduce_(0, pix, z, reduce="amax")
    nearest = z >= zbuf[pix]
    owner = torch.full((B * H * W,), -1, dtype=torch.long).scatter_reduce_(
        0, pix[nearest], tri[nearest], reduce="amax")  # the visible face of each pixel (or -1)
    img = torch.tensor(BACKGROUND).repeat(B * H * W, 1)
    hit = owner >= 0
    o = owner[hit]
    img[hit] = face_rgb[f_idx[o]] * shade[b_idx[o], f_idx[o]][:, None]
    img = img.reshape(B, H, W, 3)
    if supersample > 1:
        img = torch.nn.functional.avg_pool2d(img.permute(0, 3, 1, 2), supersample).permute(0, 2, 3, 1)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def face_colours(model: body.BodyModel) -> torch.Tensor:
    """(F, 3) colour of each face from the side (left, right, midline) of its first vertex's joint."""
    side = torch.tensor([body.side_of_joint(j) for j in range(body.NUM_JOINTS)])
    return PALETTE[side[model.vertex_joint[model.faces[:, 0]]] % 3]
