"""Point-defect analysis of ADF-STEM images of 2H transition-metal dichalcogenide monolayers.

Follows Yang et al. (2024) (2H-MoTe2) for any material of ``flake_core.materials`` with a
``StemLattice`` (MoS2, MoSe2, MoTe2, WS2, WSe2, NbSe2), on any annular detector:
adf -> detector angles and Z-contrast; simulate -> training data with ground truth;
lattice -> the lattice found in the image (orientation, spacing, tiles); calibrate ->
column intensities measured on the image and normalised (self-calibration), masks;
models -> CNN-1 (hexagonal cells) and CNN-2 (defect classes); casting -> hexagonal-net
casting; analyze -> the pipeline with counts and concentrations; io -> microscope
files; report -> files.
"""

from flake_core.materials import stem_lattice

# Unit-cell classes, the same for every material (flake_msgs/DefectCell's constants): atoms
# left in the (metal, chalcogen) columns of a unit cell. Names per material: class_names().
CLASS_ATOMS = ((1, 2), (1, 1), (1, 0), (0, 2), (0, 1), (0, 0))
CLASS_COUNT = len(CLASS_ATOMS)
GENERIC_CLASS_NAMES = ('Perfect', 'V_X', 'V_X2', 'V_M', 'V_M+V_X', 'V_M+V_X2')
# Overlay colours (RGB) as in Yang et al. (2024), Fig. 1c: grey, red, yellow, blue, olive, purple.
CLASS_COLOURS = ((150, 150, 150), (230, 30, 30), (240, 220, 20), (40, 90, 230), (128, 128, 0),
                 (150, 50, 200))


def class_names(material: str) -> tuple[str, ...]:
    """Class names for ``material`` (e.g. WSe2: Perfect, V_Se, V_Se2, V_W, V_W+V_Se, V_W+V_Se2)."""
    return stem_lattice(material).defect_classes
