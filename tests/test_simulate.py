import numpy as np

from labelling.data.simulate import CHANNELS, simulate_field, simulate_plate


def test_field_is_deterministic_and_shaped():
    a, b = simulate_field([1, 2, 3], size=96), simulate_field([1, 2, 3], size=96)
    assert np.array_equal(a.brightfield, b.brightfield) and np.array_equal(a.fluorescence, b.fluorescence)
    assert a.brightfield.shape == (96, 96) and a.fluorescence.shape == (len(CHANNELS), 96, 96)
    assert a.masks.shape == (len(CHANNELS), 96, 96) and a.masks.dtype == bool
    assert not np.array_equal(a.brightfield, simulate_field([1, 2, 4], size=96).brightfield)


def test_nuclei_inside_cells_with_matching_ids():
    f = simulate_field(0, size=128)
    inside = f.nuclei > 0
    assert inside.any()
    assert np.array_equal(f.nuclei[inside], f.cells[inside])
    # nuclear stain is brighter inside nuclei than in cytoplasm
    nuc = f.channel("nuclei")
    assert nuc[inside].mean() > 2 * nuc[(f.cells > 0) & ~inside].mean() - 100


def test_brightfield_carries_cell_structure():
    f = simulate_field(3, size=128)
    edges = np.abs(np.gradient(f.brightfield)[0])
    assert edges[f.cells > 0].mean() > 1.5 * edges[f.cells == 0].mean()


def test_plate_ids_phenotypes_and_gfp_negative_clones():
    plate = simulate_plate(0, n_wells=8, fields_per_well=2, size=96, gfp_negative_fraction=0.5)
    assert len(plate) == 16 and len({(f.well, f.field) for f in plate}) == 16
    assert {f.phenotype for f in plate} == {0, 1}
    neg = [f for f in plate if not f.gfp_positive]
    pos = [f for f in plate if f.gfp_positive]
    assert neg and pos
    gfp = lambda f: f.channel("gfp")[f.cells > 0].mean()  # noqa: E731
    assert max(map(gfp, neg)) < 0.5 * min(map(gfp, pos))
    # growing the plate never changes existing fields
    again = simulate_plate(0, n_wells=9, fields_per_well=2, size=96, gfp_negative_fraction=0.5)
    assert np.array_equal(again[5].brightfield, plate[5].brightfield)


def test_treated_phenotype_disperses_golgi():
    def spread(ph):
        d = []
        for s in range(4):
            f = simulate_field([s, ph], size=128, phenotype=ph, noise=0.0)
            g = np.where(f.channel("golgi") > 150, f.channel("golgi") - 100, 0)  # puncta only
            near = (f.cells > 0) & (f.nuclei == 0)
            # Golgi mass far from nuclei (distance transform of the non-nuclear area)
            from scipy import ndimage as ndi

            dist = ndi.distance_transform_edt(f.nuclei == 0)
            d.append((np.clip(g, 0, None) * dist * near).sum() / np.clip(g, 0, None)[near].sum())
        return np.mean(d)

    assert spread(1) > 1.3 * spread(0)
