"""Labelling: a keyboard-driven grid of unlabelled flakes and crops, label corrections and withdrawals, retraining."""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse

from flake_registry import labelling
from flake_registry.query import INVALID_ARGUMENT, MAX_LIMIT, FlakeQuery, RegistryError
from flake_registry.web.context import NavEntry, require_read, require_write, web
from flake_registry.web.forms import WHO_MAX, ControlIn, LabelBatchIn, LabelIn, RetrainIn, check_flake_id
from flake_registry.web.rendering import page
from flake_registry.web.routers.auth import safe_next
from flake_registry.web.summaries import thin_first

NAV = NavEntry('labels', 'Labelling', '/labels')
router = APIRouter(dependencies=[Depends(require_read)])
QUEUE_SIZE = 60
REMEMBER_S = 180 * 86400


def _remember(response, who: str):
    """The labeller's name, kept for the next visit (the grid and flake pages fill it in)."""
    response.set_cookie('labeller', labelling.check_who(who), max_age=REMEMBER_S, samesite='strict')
    return response


def _label_one(request: Request, who: str, verdict: str, material: str, layer_class, flake_id: str = '',
               crop_path: str = '') -> int:
    ctx = web(request)
    label = labelling.make_label(verdict, material, layer_class)
    if bool(flake_id) == bool(crop_path):
        raise RegistryError(INVALID_ARGUMENT, 'give exactly one of flake_id and crop_path')
    if flake_id:
        return labelling.label_flake(ctx.store, check_flake_id(flake_id), label, who)
    return labelling.label_crop(ctx.store, ctx.data_dir, crop_path, label, who)


@router.get('/labels', response_class=HTMLResponse, include_in_schema=False)
def labels_page(request: Request, who: str = Query('', max_length=WHO_MAX)):
    ctx = web(request)
    latest = labelling.latest_labels(ctx.store)
    labelled_flakes = {r['flake_id'] for r in latest if r['flake_id']}
    labelled_crops = {r['crop_path'] for r in latest if r['crop_path']}
    # Thin flakes first: they are the ones worth a person's look.
    thin = thin_first(ctx.store, min(QUEUE_SIZE + len(labelled_flakes), MAX_LIMIT))
    rest = ctx.store.query(FlakeQuery(sort_by='score', limit=300), contours=False).flakes
    seen: set[str] = set()
    queue = []
    for flake in thin + rest:
        if flake.id in labelled_flakes or flake.id in seen:
            continue
        seen.add(flake.id)
        queue.append(flake)
        if len(queue) >= QUEUE_SIZE:
            break
    crops = [c for c in labelling.candidate_crops(ctx.data_dir) if c not in labelled_crops][:QUEUE_SIZE]
    counts = {'good': sum(1 for r in latest if r['parsed'].good), 'bad': sum(1 for r in latest if not r['parsed'].good)}
    rows = ctx.store.labels()
    withdrawn = labelling.withdrawn_ids(rows)
    recent = []
    for row in rows[-30:][::-1]:
        parsed = labelling.decode_label(row['label'])
        if parsed is None:
            continue
        gone = withdrawn.get(row['id'])
        recent.append({'id': row['id'], 'when': row['created'], 'who': row['labelled_by'] or '',
                       'flake_id': row['flake_id'] or '', 'crop_path': row['crop_path'] or '', 'label': row['label'],
                       'withdrawn_by': gone['labelled_by'] if gone else ''})
    return page(request, 'labels.html', {
        'page': 'labels', 'queue': queue, 'crops': crops, 'counts': counts, 'recent': recent[:20],
        'who': who or request.cookies.get('labeller', ''), 'retrain': ctx.retrain.status.as_dict(),
        'targets': retrain_targets()})


def retrain_targets() -> list[str]:
    from flake_detector.cascade import TARGETS

    return sorted(TARGETS)


@router.post('/flakes/{flake_id}/labels', dependencies=[Depends(require_write)], include_in_schema=False)
def label_flake_form(request: Request, flake_id: str, who: str = Form(..., max_length=WHO_MAX),
                     verdict: str = Form(..., max_length=16), material: str = Form(..., max_length=32),
                     layer_class: str = Form(..., max_length=16)):
    _label_one(request, who, verdict, material, layer_class, flake_id=flake_id)
    response = RedirectResponse(f'/flakes/{flake_id}?{urlencode({"who": who, "done": "label saved"})}',
                                status_code=303)
    return _remember(response, who)


@router.post('/labels/crop', dependencies=[Depends(require_write)], include_in_schema=False)
def label_crop_form(request: Request, crop_path: str = Form(..., max_length=512),
                    who: str = Form(..., max_length=WHO_MAX), verdict: str = Form(..., max_length=16),
                    material: str = Form('unknown', max_length=32), layer_class: str = Form('unknown', max_length=16)):
    _label_one(request, who, verdict, material, layer_class, crop_path=crop_path)
    return _remember(RedirectResponse(f'/labels?{urlencode({"who": who})}', status_code=303), who)


@router.post('/labels/{label_id}/withdraw', dependencies=[Depends(require_write)], include_in_schema=False)
def withdraw_form(request: Request, label_id: int, who: str = Form(..., max_length=WHO_MAX),
                  back: str = Form('/labels', max_length=200)):
    labelling.withdraw_label(web(request).store, label_id, who)
    return RedirectResponse(safe_next(back), status_code=303)


@router.post('/api/labels', status_code=201, dependencies=[Depends(require_write)])
def label_api(request: Request, body: LabelIn):
    """Label a flake or a candidate crop (``verdict:material:layer_class``); a newer label corrects an older one."""
    label_id = _label_one(request, body.who, body.verdict, body.material, body.layer_class, body.flake_id,
                          body.crop_path)
    return {'id': label_id, 'label': labelling.make_label(body.verdict, body.material, body.layer_class).encode()}


@router.post('/api/labels/batch', status_code=201, dependencies=[Depends(require_write)])
def label_batch_api(request: Request, body: LabelBatchIn):
    """Several labels by one labeller (the keyboard grid); all are checked before any is stored."""
    labelling.check_who(body.who)
    checked = []
    for item in body.items:
        labelling.make_label(item.verdict, item.material, item.layer_class)
        if bool(item.flake_id) == bool(item.crop_path):
            raise RegistryError(INVALID_ARGUMENT, 'each item needs exactly one of flake_id and crop_path')
        if item.flake_id:
            web(request).store.get_flake(check_flake_id(item.flake_id))
        else:
            labelling.resolve_crop(web(request).data_dir, item.crop_path)
        checked.append(item)
    ids = [_label_one(request, body.who, i.verdict, i.material, i.layer_class, i.flake_id, i.crop_path)
           for i in checked]
    return _remember_json({'ids': ids, 'count': len(ids)}, body.who)


def _remember_json(body: dict, who: str):
    return _remember(JSONResponse(body, status_code=201), who)


@router.post('/api/labels/{label_id}/withdraw', dependencies=[Depends(require_write)])
def withdraw_api(request: Request, label_id: int, body: ControlIn):
    """Withdraw (delete) a label; the row stays in the history with who withdrew it and when."""
    withdrawal = labelling.withdraw_label(web(request).store, label_id, body.who)
    return {'withdrawn': label_id, 'id': withdrawal}


@router.get('/crops/{crop_path:path}', include_in_schema=False)
def crop_image(request: Request, crop_path: str):
    return FileResponse(labelling.resolve_crop(web(request).data_dir, crop_path))


# -- retraining --------------------------------------------------------------------------------------


@router.post('/api/retrain', status_code=202, dependencies=[Depends(require_write)])
def retrain_start(request: Request, body: RetrainIn):
    """Retrain the cascade of ``target`` from the labels, in the background (one at a time)."""
    labelling.check_who(body.who)
    if body.target not in retrain_targets():
        raise RegistryError(INVALID_ARGUMENT, f'unknown target {body.target!r}; one of {retrain_targets()}')
    return web(request).retrain.start(body.target, body.who).as_dict()


@router.get('/api/retrain')
def retrain_status(request: Request):
    """The current or last retraining: state, message, log lines."""
    return web(request).retrain.status.as_dict()
