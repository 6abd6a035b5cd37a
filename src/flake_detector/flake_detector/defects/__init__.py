"""Point-defect analysis of HAADF-STEM images of monolayer 2H-MoTe2 (seed 003).

simulate -> training data with ground truth; models -> CNN-1 (hexagonal cells),
direct unit-cell detector, CNN-2 (defect classes); casting -> hexagonal-net casting;
analyze -> the full pipeline with counts and concentrations; report -> files.
"""

CLASS_NAMES = ('Perfect', 'V_Te1', 'V_Te2', 'V_Mo', 'V_Te1+V_Mo', 'V_Te2+V_Mo')
# Overlay colours (RGB) as in seed 003 Fig. 1c: grey, red, yellow, blue, olive, purple.
CLASS_COLOURS = ((150, 150, 150), (230, 30, 30), (240, 220, 20), (40, 90, 230), (128, 128, 0),
                 (150, 50, 200))
