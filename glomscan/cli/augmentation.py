"""For the people who grow training sets with synthetic sclerosed glomeruli: ``augment crops |
masks | synthesize`` (the mask DCGAN and the inpainting GAN are trained with ``train``)."""

from __future__ import annotations

from pathlib import Path

import click

from ..augment.settings import CropSettings, MaskGenerationSettings, OutlineCropSettings, SynthesisSettings
from .common import default, fail_on, seed_option, verbosity

EXISTING_DIR = click.Path(exists=True, file_okay=False, path_type=Path)


@click.group(short_help="Crop, generate masks and paint synthetic sclerosed glomeruli.")
def augment():
    """The paper's augmentation: crops of sclerosed glomeruli (for the GANs), masks from the mask
    DCGAN, and synthetic sclerosed glomeruli inpainted into training patches."""


@augment.command("crops", short_help="Crop every sclerosed glomerulus with its mask.")
@click.option("--data", "dataset_dir", type=EXISTING_DIR, default=None, help="Set made by 'glomscan prepare'.")
@click.option("--from-crop-set", "crop_set_dir", type=EXISTING_DIR, default=None,
              help="Or a glomerulus crop set with real outlines (labels.csv + images/ + masks/), split by slide as "
                   "'prepare' splits it (--test-fraction is its validation fraction).")
@click.option("--tiles", "tiles_dir", type=EXISTING_DIR, default=None,
              help="With --from-crop-set: tile set whose tissue surrounds each glomerulus (else reflection padding).")
@click.option("--tiles-mpp", type=float, default=default(OutlineCropSettings, "tiles_mpp"), show_default=True, help="µm/px of the tile set's images.")
@click.option("--classes", type=click.Choice(["sclerosed", "normal", "all"]), default=default(OutlineCropSettings, "classes"), show_default=True,
              help="With --from-crop-set: which glomeruli.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for the glomerulus crops.")
@click.option("--size", type=int, default=default(CropSettings, "size"), show_default=True, help="Crop side, px.")
@click.option("--test-fraction", type=float, default=default(CropSettings, "test_fraction"), show_default=True, help="Share of glomeruli for the test split.")
@seed_option()
@click.option("--split", type=click.Choice(["train", "val", "all"]), default=default(CropSettings, "split"), show_default=True,
              help="Dataset split the glomeruli come from.")
@verbosity
@fail_on(ValueError)
def crops(dataset_dir, crop_set_dir, tiles_dir, tiles_mpp, classes, out_dir, size, test_fraction, seed, split):
    """Crop every sclerosed glomerulus (centred on its minimum enclosing circle) with its mask."""
    from ..augment.crops import CropSettings, make_crops

    if (dataset_dir is None) == (crop_set_dir is None):
        raise click.UsageError("give --data (a prepared set) or --from-crop-set (a crop set with outlines)")
    if crop_set_dir is not None:
        from ..augment.outline_crops import OutlineCropSettings, make_outline_crops

        manifest = make_outline_crops(crop_set_dir, out_dir, OutlineCropSettings(
            size=size, classes=classes, validation_fraction=test_fraction, seed=seed, tiles_mpp=tiles_mpp),
            tiles_dir=tiles_dir)
        counts = manifest.split.value_counts().to_dict()
        click.echo(f"wrote {len(manifest)} {classes} crops to {out_dir} (train {counts.get('train', 0)}, test "
                   f"{counts.get('test', 0)}: the validation slides)")
        return

    summary = make_crops(dataset_dir, out_dir, CropSettings(size, test_fraction, seed, split))
    counts = summary.manifest.split.value_counts().to_dict()
    click.echo(f"wrote {len(summary.manifest)} crops to {out_dir} (train {counts.get('train', 0)}, test "
        f"{counts.get('test', 0)}) from {summary.census.total} sclerosed glomeruli; not cropped: "
        f"{summary.too_large} wider than {size} px, {summary.census.cut_only} cut by the patch border everywhere")


@augment.command("masks", short_help="Sample glomerulus masks from the mask DCGAN.")
@click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Mask generator made by 'glomscan train masks'.")
@click.option("--count", type=click.IntRange(min=1), required=True,
              help="How many to write.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for the generated masks.")
@click.option("--size", type=int, default=default(MaskGenerationSettings, "size"), show_default=True, help="Mask canvas side, px.")
@click.option("--threshold", type=float, default=default(MaskGenerationSettings, "threshold"), show_default=True,
              help="Probability above which a generated pixel belongs to the mask.")
@click.option("--min-island-px", type=int, default=default(MaskGenerationSettings, "min_island_px"), show_default=True, help="Islands below this area are removed.")
@click.option("--diameter-range", type=(float, float), default=None, metavar="MIN MAX",
              help="Equivalent diameters (px) spread evenly over this range (default: the real masks' range).")
@seed_option()
@verbosity
@fail_on(ValueError)
def masks(model_path, count, out_dir, size, threshold, min_island_px, diameter_range, seed):
    """Sample masks, threshold, keep one main contour, spread sizes evenly over a range, save PNGs + masks.csv."""
    from ..augment.maskgan import MaskGenerationSettings, generate_masks, load_mask_generator, write_masks

    generator, _, info = load_mask_generator(model_path)
    default = (info["diameter_min_px"], info["diameter_max_px"])
    settings = MaskGenerationSettings(size, threshold, min_island_px,
                                      tuple(diameter_range) if diameter_range else None, seed)
    generated, records = generate_masks(generator, count, settings, default)
    csv_path = write_masks(out_dir, generated, records)
    low, high = settings.diameter_range or default
    click.echo(f"wrote {len(generated)} masks ({size} px, equivalent diameters {low:.0f}-{high:.0f} px) to {out_dir}; "
        f"table {csv_path}")


@augment.command("synthesize", short_help="Inpaint synthetic sclerosed glomeruli into patches.")
@click.option("--data", "dataset_dir", type=EXISTING_DIR, required=True,
              help="Set made by 'glomscan prepare' whose tissue receives the synthetic glomeruli.")
@click.option("--generator", "generator_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="Inpainting generator from 'glomscan train inpaint'.")
@click.option("--masks", "mask_dir", type=EXISTING_DIR, required=True,
              help="Folder of glomerulus masks (from 'glomscan augment masks' or crops).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for the new training patches.")
@click.option("--amount", type=float, default=default(SynthesisSettings, "amount"), show_default=True,
              help="Synthetic glomeruli per real sclerosed glomerulus of the training split.")
@click.option("--feather", "feather_px", type=float, default=default(SynthesisSettings, "feather_px"), show_default=True,
              help="Blend width (px) inside the mask border.")
@click.option("--min-distance-px", type=int, default=default(SynthesisSettings, "min_distance_px"), show_default=True,
              help="Gap kept to every labelled glomerulus.")
@seed_option()
@verbosity
@fail_on(ValueError)
def synthesize(dataset_dir, generator_path, mask_dir, out_dir, amount, feather_px, min_distance_px, seed):
    """Inpaint synthetic sclerosed glomeruli into training patches; writes a dataset 'train segment' reads."""
    from ..augment.inpaint import load_inpainter
    from ..augment.maskgan import read_masks
    from ..augment.synthesize import SynthesisSettings, synthesize as paint
    from ..train.dataset.data import synthetic_rows

    summary = paint(dataset_dir, out_dir, load_inpainter(generator_path), read_masks(mask_dir),
                    SynthesisSettings(amount, feather_px, min_distance_px, seed))
    n_patches = int(synthetic_rows(summary.manifest).sum())
    click.echo(f"{len(summary.placements)} synthetic sclerosed glomeruli ({amount:g} x {summary.real_sclerosed} real) "
        f"in {n_patches} new training patches -> {out_dir} (examples {summary.examples_path})")


COMMANDS = (augment,)
