"""Offline evaluation of a recorded scan: a tiny bag whose metrics are known by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flake_detector.bag_evaluate import GroundTruthError, evaluate_bag, main
from flake_scanner.bag.io import (
    GROUND_TRUTH_FILE,
    GROUND_TRUTH_TOPIC,
    SCAN_FRAME_TYPE,
    STRING_TYPE,
    BagWriter,
    NoFramesError,
)

PIXEL = 1e-6
TILE = 64
BACKGROUND = (100, 100, 100)
# G channel of a drawn flake -> (material, score); R channel = 10 x layers.
MARKERS = {10: ('graphene', 0.9), 11: ('graphene', 0.6), 20: ('hbn', 0.8)}


@pytest.fixture(scope='module')
def marker_backend():
    """A deterministic backend: flakes are the connected regions whose blue channel is 200."""
    from scipy import ndimage

    from flake_detector.detection import Detection, FrameResult, FunnelStage, register_detector

    class MarkerDetector:
        name = 'bagtest_marker'
        model_version = 'test'

        def __init__(self, min_score: float = 0.0):
            self.min_score = min_score

        def detect(self, image_bgr):
            labels, count = ndimage.label(image_bgr[:, :, 0] == 200)
            detections = []
            for index, box in enumerate(ndimage.find_objects(labels), start=1):
                ys, xs = box
                mask = labels[box] == index
                material, score = MARKERS[int(image_bgr[ys.start, xs.start, 1])]
                layers = float(image_bgr[ys.start, xs.start, 2]) / 10.0
                if score >= self.min_score:
                    detections.append(Detection(bbox=(xs.start, ys.start, xs.stop - xs.start, ys.stop - ys.start),
                                                mask=mask, material=material, layers=layers, score=score,
                                                detector=self.name, model_version=self.model_version))
            return FrameResult(detections, candidates=count,
                               funnel=[FunnelStage('components', count), FunnelStage('accepted', len(detections))])

    register_detector('bagtest_marker')(lambda **params: MarkerDetector(**params))
    return 'bagtest_marker'


def _annotation(image_id, mask, material, layers, category_id, contaminant=False):
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    bbox = [float(v) for v in mask_utils.toBbox(rle)]
    rle['counts'] = rle['counts'].decode('ascii')
    return {'image_id': image_id, 'category_id': category_id, 'segmentation': rle, 'bbox': bbox,
            'area': float(mask.sum()), 'iscrowd': 0, 'is_contaminant': contaminant,
            'attributes': {'material': material, 'layers': layers}}


def _draw(image, ys, xs, code, layers):
    image[ys, xs] = (200, code, int(layers * 10))


def _make_scan(tmp_path, truth_in_bag: bool = False):
    """Two 128x64 ground-truth frames, recorded as four 64x64 tiles (as the tiler cuts them).

    Frame A: graphene 1 layer (left tile) and hBN 3 layers (right tile), both drawn,
    plus an undrawn dust particle (a contaminant, ignored). Frame B: graphene 2 layers
    in the truth but not drawn (missed), and a drawn graphene-looking blob with no truth
    (spurious, score 0.6).
    """
    from rclpy.serialization import serialize_message

    from flake_core.ros_image import numpy_to_image
    from flake_msgs.msg import ScanFrame

    frames = {1: np.full((TILE, 2 * TILE, 3), BACKGROUND, np.uint8), 2: np.full((TILE, 2 * TILE, 3), BACKGROUND,
                                                                                  np.uint8)}
    origin_x = {1: 0.0, 2: 1e-3}
    masks = {}
    for name, (image_id, ys, xs) in {'g1': (1, slice(10, 25), slice(10, 30)), 'h3': (1, slice(20, 40), slice(80, 100)),
                                     'dust': (1, slice(40, 50), slice(40, 50)), 'g2': (2, slice(5, 20), slice(5, 20)),
                                     'spur': (2, slice(30, 45), slice(70, 90))}.items():
        mask = np.zeros((TILE, 2 * TILE), bool)
        mask[ys, xs] = True
        masks[name] = (image_id, mask, ys, xs)
    _draw(frames[1], masks['g1'][2], masks['g1'][3], 10, 1)
    _draw(frames[1], masks['h3'][2], masks['h3'][3], 20, 3)
    _draw(frames[2], masks['spur'][2], masks['spur'][3], 11, 5)
    annotations = [_annotation(1, masks['g1'][1], 'graphene', 1, 1), _annotation(1, masks['h3'][1], 'hbn', 3, 2),
                   _annotation(1, masks['dust'][1], 'dust', 0, 102, contaminant=True),
                   _annotation(2, masks['g2'][1], 'graphene', 2, 1)]
    for number, annotation in enumerate(annotations, start=1):
        annotation['id'] = number
    coco = {'images': [{'id': i, 'file_name': f'frame_{i}.png', 'width': 2 * TILE, 'height': TILE,
                        'pixel_to_wafer': [PIXEL, 0.0, origin_x[i], 0.0, PIXEL, 0.0]} for i in (1, 2)],
            'annotations': annotations,
            'categories': [{'id': 1, 'name': 'graphene'}, {'id': 2, 'name': 'hbn'}, {'id': 102, 'name': 'dust'}]}
    bag = tmp_path / 'scan'
    with BagWriter(bag) as writer:
        writer.add_topic('/scan/tiles', SCAN_FRAME_TYPE)
        if truth_in_bag:  # one message per ground-truth frame, as a live publisher would send them
            from std_msgs.msg import String

            writer.add_topic(GROUND_TRUTH_TOPIC, STRING_TYPE)
            for image in coco['images']:
                part = {**coco, 'images': [image],
                        'annotations': [a for a in coco['annotations'] if a['image_id'] == image['id']]}
                writer.write(GROUND_TRUTH_TOPIC, image['id'], serialize_message(String(data=json.dumps(part))))
        stamp = 10**9
        for image_id in (1, 2):
            for column in (0, 1):
                tile = ScanFrame(scan_id='scan-eval', tile_index=image_id - 1, tile_col=column, pixel_size=PIXEL)
                pixels = frames[image_id][:, column * TILE:(column + 1) * TILE]
                tile.image = numpy_to_image(np.ascontiguousarray(pixels), 'bgr8')
                tile.pixel_to_wafer = [PIXEL, 0.0, origin_x[image_id] + column * TILE * PIXEL, 0.0, PIXEL, 0.0]
                writer.write('/scan/tiles', stamp, serialize_message(tile))
                stamp += 10**8
        # a high-magnification revisit capture: not part of the scan grid the truth describes
        revisit = ScanFrame(scan_id='scan-eval', revisit=True, revisit_flake_id='flake-1', pixel_size=PIXEL / 5)
        revisit.image = numpy_to_image(np.full((TILE, TILE, 3), BACKGROUND, np.uint8), 'bgr8')
        revisit.pixel_to_wafer = [PIXEL / 5, 0.0, 3e-3, 0.0, PIXEL / 5, 0.0]
        writer.write('/scan/tiles', stamp, serialize_message(revisit))
    if not truth_in_bag:
        (bag / GROUND_TRUTH_FILE).write_text(json.dumps(coco))
    return bag


@pytest.mark.parametrize('truth_in_bag', [False, True], ids=['truth_beside', 'truth_topic'])
def test_evaluation_of_a_tiny_bag_gives_the_hand_computed_metrics(ros, tmp_path, marker_backend, truth_in_bag):
    bag = _make_scan(tmp_path, truth_in_bag)
    output = tmp_path / 'report'
    report = evaluate_bag(bag, [(marker_backend, {}), (marker_backend, {'min_score': 0.7})], output)
    assert report['frames'] == 4
    assert report['ground_truth_flakes'] == 4  # three flakes and the dust particle, cropped to tiles
    everything = report['backends']['bagtest_marker']
    metrics = everything['metrics']['materials']
    # all flakes: scores 0.9 (hit), 0.8 (hit), 0.6 (miss) against 3 flakes -> precision 1 up to
    # recall 2/3: 67 of COCO's 101 recall points
    assert metrics['all']['bbox']['AP'] == pytest.approx(67 / 101)
    assert metrics['all']['segm']['AP'] == pytest.approx(67 / 101)
    assert metrics['graphene']['segm']['AP50'] == pytest.approx(51 / 101)
    assert metrics['hbn']['segm']['AP'] == pytest.approx(1.0)
    # per image (Masubuchi et al. (2020)): A-left, A-right correct; B-left missed; B-right spurious
    per_image = metrics['all']['per_image']
    assert (per_image['tp'], per_image['fp'], per_image['fn']) == (2, 1, 1)
    confusion = everything['metrics']['layer_confusion']
    assert confusion['table']['mono']['mono'] == 1 and confusion['table']['few']['few'] == 1
    assert confusion['table']['few']['missed'] == 1 and confusion['table']['spurious']['few'] == 1
    assert everything['metrics']['funnel'] == [{'stage': 'components', 'remaining': 3},
                                               {'stage': 'accepted', 'remaining': 3}]
    curve = everything['pr_curves']['all']
    assert curve['precision'] == pytest.approx([1.0, 1.0, 2 / 3])
    assert curve['recall'] == pytest.approx([1 / 3, 2 / 3, 2 / 3])
    # the stricter backend side by side: the spurious blob is gone, image precision 1
    strict = report['backends']['bagtest_marker(min_score=0.7)']['metrics']['materials']['all']
    assert strict['per_image']['precision'] == pytest.approx(1.0)
    assert strict['per_image']['recall'] == pytest.approx(2 / 3)
    names = {p.name for p in output.iterdir()}
    assert {'report.json', 'report.md', 'pr_all.png', 'pr_graphene.png', 'pr_hbn.png'} <= names
    markdown = (output / 'report.md').read_text()
    assert '| bagtest_marker | ' in markdown and '| bagtest_marker(min_score=0.7) | ' in markdown
    assert json.loads((output / 'report.json').read_text())['frames'] == 4


def test_command_line_and_clear_errors(ros, tmp_path, marker_backend, capsys):
    bag = _make_scan(tmp_path)
    assert main([str(bag), '--backends', 'bagtest_marker;bagtest_marker:min_score=0.7',
                 '--output', str(tmp_path / 'cli')]) == 0
    assert (tmp_path / 'cli' / 'pr_all.png').stat().st_size > 1000
    assert main([str(bag), '--backends', 'no_such_backend']) == 2
    assert 'unknown detector backend' in capsys.readouterr().err
    (bag / GROUND_TRUTH_FILE).unlink()
    with pytest.raises(GroundTruthError, match='no ground truth'):
        evaluate_bag(bag, [(marker_backend, {})], None)
    empty = tmp_path / 'no_frames'
    with BagWriter(empty) as writer:
        writer.add_topic('/scan/tiles', SCAN_FRAME_TYPE)
    (empty / GROUND_TRUTH_FILE).write_text(json.dumps({'images': [], 'annotations': [], 'categories': []}))
    with pytest.raises(NoFramesError, match='no messages'):
        evaluate_bag(empty, [(marker_backend, {})], None)
    assert main([str(empty), '--backends', marker_backend]) == 2
    assert 'no messages' in capsys.readouterr().err
