"""A deterministic synthetic pathology set: H&E-like tiles with four-option questions.

Every tile is drawn from four ground-truth attributes (nuclear density, nuclear size, tissue
architecture, stain) and each item asks about one of them, PathMMU style. The set needs no download,
so the whole pipeline (SFT, GRPO, rewards, judge stand-in) can be run and tested anywhere.

Items are independent of `n`: item i depends only on (seed, i), so a larger set extends a smaller one.
Questions come in blocks of 16 that hold every (family, class) pair once, so over a set each family
is asked equally often, each class is the answer equally often and, since a family's options are
listed in a fixed order, each letter A-D is correct 25% of the time.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# family -> the four class texts, in option order (A, B, C, D).
TOY_FAMILIES: dict[str, tuple[str, ...]] = {
    "density": ("Sparse", "Moderate", "Dense", "Very dense"),
    "nuclear_size": ("Small", "Medium", "Large", "Very large"),
    "architecture": ("Gland-like rings", "Solid sheets", "Scattered single cells", "Spindle-cell fascicles"),
    "stain": ("Pale pink", "Deep pink", "Purple", "Blue-violet"),
}

_QUESTIONS = {
    "density": "What is the density of nuclei in this H&E-stained tile?",
    "nuclear_size": "How large are the nuclei in this H&E-stained tile?",
    "architecture": "Which architectural pattern do the cells form in this H&E-stained tile?",
    "stain": "Which description best fits the staining of this H&E tile?",
}

_LETTERS = "ABCD"
_BASE_SIZE = 112  # the geometry below is in pixels of a 112 x 112 tile and scaled to `image_size`

_NUCLEI_COUNT = {"sparse": (6, 9), "moderate": (16, 22), "dense": (32, 42), "very dense": (56, 70)}
_NUCLEUS_RADIUS = {"small": 2.0, "medium": 3.0, "large": 4.2, "very large": 5.6}
# stain -> (background eosin RGB, nucleus hematoxylin RGB)
_PALETTE = {
    "pale pink": ((240, 198, 218), (160, 112, 182)),
    "deep pink": ((228, 138, 180), (105, 42, 125)),
    "purple": ((188, 132, 196), (78, 38, 112)),
    "blue-violet": ((170, 166, 220), (52, 50, 128)),
}
_LUMEN_RGB = (248, 243, 248)

# Explanations: what the tile shows, then the other options are ruled out by name.
_EVIDENCE = {
    "density": {
        "sparse": "Only about {count} hematoxylin-stained nuclei lie in the tile, with wide stroma between them",
        "moderate": "About {count} nuclei are present, separated by regular bands of pink stroma",
        "dense": "About {count} nuclei crowd the tile with little stroma left between them",
        "very dense": "Around {count} nuclei pack the tile and touch each other, leaving almost no stroma",
    },
    "nuclear_size": {
        "small": "The nuclei are compact, about {diameter} pixels across, close to the size of resting lymphocytes",
        "medium": "The nuclei are about {diameter} pixels across, larger than lymphocytes but not enlarged",
        "large": "The nuclei are enlarged, about {diameter} pixels across, with open pale chromatin",
        "very large": "The nuclei are markedly enlarged, about {diameter} pixels across, as in high-grade atypia",
    },
    "architecture": {
        "gland-like rings": "Nuclei line the rim of round pale lumens, the way epithelium lines a gland",
        "solid sheets": "Nuclei form one cohesive cluster of touching cells, with no lumens inside it",
        "scattered single cells": "Nuclei lie singly and evenly apart in the stroma, without clusters or lumens",
        "spindle-cell fascicles": "Elongated spindle nuclei run in parallel streams along the collagen fibres",
    },
    "stain": {
        "pale pink": "The eosin background is light pink and the nuclei are faint, as in weak staining",
        "deep pink": "The stroma is a saturated eosinophilic pink with crisp dark purple nuclei",
        "purple": "Hematoxylin tints the stroma as well as the nuclei, giving the tile a purple cast",
        "blue-violet": "The colours are cool blue-violet, hematoxylin clearly dominating eosin",
    },
}
_CONCLUSION = {
    "density": "the nuclear density is {answer}",
    "nuclear_size": "the nuclei are {answer}",
    "architecture": "the pattern is {answer}",
    "stain": "the stain is {answer}",
}


def make_toy_dataset(n: int, seed: int = 0, image_size: int = 112, families: tuple[str, ...] | None = None) -> list[dict]:
    """`n` synthetic items; the same seed and image_size always give identical rows and pixels.

    Each row: id, image (RGB PIL image), question, options ("A) ..." to "D) ..."), solution (one of
    the options), explanation (a short reasoning that eliminates the other options), attributes (the
    ground truth the tile was drawn from, plus `nuclei_count`), family and source ("toy").
    `families` (optional) keeps only questions of those families: the first `n` such items of the
    full sequence, so their ids and pixels are the same as in the unrestricted set.
    """
    if n < 0 or seed < 0 or image_size < 32:
        raise ValueError(f"need n >= 0, seed >= 0, image_size >= 32; got n={n}, seed={seed}, image_size={image_size}")
    all_families = list(TOY_FAMILIES)
    wanted = set(all_families if families is None else families)
    if not wanted or wanted - set(all_families):
        raise ValueError(f"families must be a non-empty subset of {all_families}, got {families!r}")
    pairs = [(family, k) for family in all_families for k in range(4)]
    rows = []
    i = 0
    while len(rows) < n:
        block, slot = divmod(i, len(pairs))
        family, answer_index = pairs[np.random.default_rng([seed, 0, block]).permutation(len(pairs))[slot]]
        i += 1
        if family not in wanted:
            continue
        rng = np.random.default_rng([seed, 1, i - 1])
        attributes = {f: TOY_FAMILIES[f][rng.integers(4)].lower() for f in all_families}
        attributes[family] = TOY_FAMILIES[family][answer_index].lower()
        image, count, diameter = _draw_tile(attributes, rng, image_size)
        attributes["nuclei_count"] = count
        options = [f"{letter}) {text}" for letter, text in zip(_LETTERS, TOY_FAMILIES[family])]
        rows.append(
            {
                "id": f"toy-{seed}-{i - 1}",
                "image": image,
                "question": _QUESTIONS[family],
                "options": options,
                "solution": options[answer_index],
                "explanation": _explain(family, attributes, count, diameter),
                "attributes": attributes,
                "family": family,
                "source": "toy",
            }
        )
    return rows


def _explain(family: str, attributes: dict, count: int, diameter: int) -> str:
    answer = attributes[family]
    others = [c.lower() for c in TOY_FAMILIES[family] if c.lower() != answer]
    evidence = _EVIDENCE[family][answer].format(count=count, diameter=diameter)
    conclusion = _CONCLUSION[family].format(answer=answer)
    return f"{evidence}, so {others[0]}, {others[1]} and {others[2]} do not fit; {conclusion}."


def _draw_tile(attributes: dict, rng: np.random.Generator, size: int) -> tuple[Image.Image, int, int]:
    """Render one tile; returns (image, number of nuclei drawn, mean nucleus diameter in pixels).

    A spindle nucleus is 1.9 diameters long and half a diameter wide: about the same area as a round one.
    """
    scale = size / _BASE_SIZE
    radius = _NUCLEUS_RADIUS[attributes["nuclear_size"]] * scale
    count = int(rng.integers(*_NUCLEI_COUNT[attributes["density"]], endpoint=True))
    architecture = attributes["architecture"]
    background, nucleus = (np.float32(np.array(c) + rng.normal(0, 5, 3)) for c in _PALETTE[attributes["stain"]])

    # Stroma: mottled eosin with collagen fibres; fascicles get long fibres along one wavy flow.
    stroma = background * (1 + 0.07 * _smooth_noise(rng, size, 6) + 0.04 * _smooth_noise(rng, size, 20))[..., None]
    stroma += rng.integers(-6, 7, stroma.shape, dtype=np.int16)  # pixel noise
    image = Image.fromarray(np.clip(stroma, 0, 255).astype(np.uint8), mode="RGB")
    flow = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    spindle = architecture == "spindle-cell fascicles"
    image.paste(_rgb(background * 0.82), mask=_fibres(rng, size, flow if spindle else None))

    centres, epithelium, lumens = _place_nuclei(architecture, count, radius, size, rng, flow)
    if epithelium is not None:
        image.paste(_rgb(0.72 * background + 0.28 * nucleus), mask=epithelium)
    if lumens is not None:
        image.paste(_LUMEN_RGB, mask=lumens)

    # Nuclei: filled ellipses with a little chromatin texture, soft edges.
    nuclei = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(nuclei)
    jitter = rng.uniform(0.85, 1.15, len(centres))
    if spindle:
        half_axes = np.stack([1.9 * radius * jitter, 0.5 * radius * jitter], axis=1)
        angles = _flow_angle(centres[:, 0], centres[:, 1], size, flow) + rng.normal(0, 0.12, len(centres))
    else:
        elongation = rng.uniform(1.0, 1.25, len(centres))
        half_axes = np.stack([radius * jitter * elongation, radius * jitter / elongation], axis=1)
        angles = rng.uniform(0, np.pi, len(centres))
    t = np.linspace(0, 2 * np.pi, 14, endpoint=False)
    cos_a, sin_a = np.cos(angles)[:, None], np.sin(angles)[:, None]
    ex, ey = half_axes[:, :1] * np.cos(t), half_axes[:, 1:] * np.sin(t)  # [count, 14]
    xs = centres[:, :1] + ex * cos_a - ey * sin_a
    ys = centres[:, 1:] + ex * sin_a + ey * cos_a
    for x, y in zip(xs, ys):
        draw.polygon(list(zip(x.tolist(), y.tolist())), fill=255)
    chromatin = nucleus * (1 + 0.12 * _smooth_noise(rng, size, size // 3))[..., None]
    chromatin_image = Image.fromarray(np.clip(chromatin, 0, 255).astype(np.uint8), mode="RGB")
    image.paste(chromatin_image, mask=nuclei.filter(ImageFilter.SMOOTH))
    return image, len(centres), round(2 * radius)


def _place_nuclei(architecture, count, radius, size, rng, flow):
    """Nucleus centres [count, 2] (x, y) for one architecture, plus optional cytoplasm and lumen masks."""
    if architecture == "gland-like rings":
        return _glands(count, radius, size, rng)
    if architecture == "solid sheets":
        return _sheet(count, radius, size, rng)
    if architecture == "spindle-cell fascicles":
        # Spread out, but neighbours are closer along the flow than across it, so nuclei form streams.
        return _spread(count, size, rng, 2 * radius, flow_angle=flow[0]), None, None
    return _spread(count, size, rng, 2 * radius), None, None


def _spread(count, size, rng, margin, existing=None, flow_angle=None, forbidden=None):
    """Best-candidate sampling: each new centre is the one of 24 random candidates farthest from the rest.

    This spreads points evenly, unlike plain uniform sampling which clumps. With `flow_angle`, distances
    across the flow count three times more than along it. `forbidden` = (centres, radii) of discs to avoid.
    """
    existing = np.empty((0, 2)) if existing is None else existing
    candidates = rng.uniform(margin, size - margin, (count, 24, 2))
    free = np.ones((count, 24), dtype=bool)
    if forbidden is not None:
        outside = np.linalg.norm(candidates[:, :, None] - forbidden[0], axis=3) >= forbidden[1]  # [count, 24, discs]
        free = outside.all(axis=2)
        free[~free.any(axis=1)] = True  # nowhere free: fall back to any candidate
    # Distances are measured after a linear map, which makes them anisotropic for fascicles.
    metric = np.eye(2)
    if flow_angle is not None:
        c, s = np.cos(flow_angle), np.sin(flow_angle)
        metric = np.array([[c, -s], [s, c]]) @ np.diag([0.5, 1.5])
    points = np.vstack([existing, np.zeros((count, 2))])
    mapped = points @ metric
    for k in range(count):
        choices, n = candidates[k][free[k]], len(existing) + k
        if n == 0:
            best = 0
        else:
            gaps = ((choices @ metric)[:, None] - mapped[None, :n]) ** 2  # [choices, n, 2]
            best = gaps.sum(axis=2).min(axis=1).argmax()
        points[n] = choices[best]
        mapped[n] = points[n] @ metric
    return points[len(existing):]


def _sheet(count, radius, size, rng):
    """A cohesive cluster: the `count` points of a jittered hexagonal grid nearest a random centre."""
    spacing = 2.3 * radius
    rows = np.arange(radius, size - radius, spacing * 0.866)
    columns = np.arange(radius, size - radius, spacing)
    grid = np.array([(x + (r % 2) * spacing / 2, y) for r, y in enumerate(rows) for x in columns])
    centre = rng.uniform(0.3 * size, 0.7 * size, 2)
    # A noisy distance gives the sheet an irregular border instead of a perfect disc.
    distance = np.linalg.norm(grid - centre, axis=1) * rng.uniform(0.8, 1.2, len(grid))
    chosen = grid[np.argsort(distance)[:count]] + rng.uniform(-0.2, 0.2, (min(count, len(grid)), 2)) * spacing
    epithelium = _disc_mask(size, chosen, np.full(len(chosen), 0.75 * spacing), opacity=0.8)
    return chosen, epithelium, None


def _glands(count, radius, size, rng):
    """1-3 glands: ~80% of nuclei on rings around pale lumens (stratified when crowded), the rest in stroma."""
    n_glands = 1 if count < 12 else 2 if count < 30 else int(rng.integers(2, 4))
    on_rings = np.array_split(np.arange(round(0.8 * count)), n_glands)
    spacing = 2.3 * radius
    max_ring = size * (0.3, 0.24, 0.2)[n_glands - 1]
    sizes = np.array([len(ids) for ids in on_rings])
    ring_radii = np.clip(sizes * spacing / (2 * np.pi), max(2.8 * radius, 0.07 * size), max_ring)
    layers = np.ceil(sizes * spacing / (2 * np.pi * ring_radii)).astype(int)  # stratify when one row can't hold them
    outer = ring_radii + 1.6 * radius + (layers - 1) * 1.8 * radius
    gland_centres = _spread(n_glands, size, rng, 0.8 * ring_radii.max())
    centres = []
    for (cx, cy), ring, n, rows in zip(gland_centres, ring_radii, sizes, layers):
        angles = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi) + rng.normal(0, 0.08, n)
        radii = ring + (np.arange(n) % rows) * 1.8 * radius + rng.normal(0, 0.15 * radius, n)
        centres.append(np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1))
    ring_nuclei = np.clip(np.vstack(centres), radius, size - radius)
    stroma = _spread(
        count - len(ring_nuclei), size, rng, 2 * radius, existing=ring_nuclei, forbidden=(gland_centres, outer)
    )
    epithelium = _disc_mask(size, gland_centres, outer, opacity=0.8)
    lumens = _disc_mask(size, gland_centres, ring_radii - 1.6 * radius, opacity=0.92)
    return np.vstack([ring_nuclei, stroma]), epithelium, lumens


def _disc_mask(size, centres, radii, opacity):
    """Paste mask ("L" image) of filled discs at the given opacity, with softened edges."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for (x, y), r in zip(centres, radii):
        if r > 0:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=round(255 * opacity))
    return mask.filter(ImageFilter.SMOOTH)


def _flow_angle(x, y, size, flow):
    """Local fibre direction: a base angle that undulates across the stream, so fascicles look wavy."""
    base, phase = flow
    across = -x * np.sin(base) + y * np.cos(base)
    return base + 0.35 * np.sin(2 * np.pi * across / size * 1.5 + phase)


def _fibres(rng, size, flow):
    """Paste mask of collagen fibres traced as streamlines; random directions unless `flow` is given."""
    aligned = flow is not None
    n_fibres, steps = (26, 30) if aligned else (14, 9)
    x, y = rng.uniform(0, size, n_fibres), rng.uniform(0, size, n_fibres)
    own_angle = rng.uniform(0, np.pi, n_fibres)
    step = 3.0 * size / _BASE_SIZE
    paths = [(x.copy(), y.copy())]
    for _ in range(steps):
        angle = _flow_angle(x, y, size, flow) if aligned else own_angle + rng.normal(0, 0.15, n_fibres)
        x, y = x + step * np.cos(angle), y + step * np.sin(angle)
        paths.append((x.copy(), y.copy()))
    xs, ys = np.stack([p[0] for p in paths], axis=1), np.stack([p[1] for p in paths], axis=1)  # [fibres, steps+1]
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for fx, fy in zip(xs, ys):
        draw.line(list(zip(fx.tolist(), fy.tolist())), fill=140, width=max(1, round(size / _BASE_SIZE)))
    return mask.filter(ImageFilter.SMOOTH)


def _smooth_noise(rng, size, cells):
    """Zero-mean noise in about [-1, 1], smooth at a scale of size / cells pixels; [size, size]."""
    coarse = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BILINEAR))


def _rgb(colour):
    """A float RGB triple as the int tuple PIL paints with."""
    return tuple(int(np.clip(round(float(c)), 0, 255)) for c in colour)
