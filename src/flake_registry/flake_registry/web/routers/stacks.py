"""Stack planner: find flakes by thickness and area, overlay a stack, reserve it whole, release it again."""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse

from flake_registry import control, stacks
from flake_registry.query import INVALID_ARGUMENT, RegistryError
from flake_registry.reservations import ROBOT_ID_MAX
from flake_registry.web import drawing
from flake_registry.web.context import NavEntry, require_read, require_write, web
from flake_registry.web.forms import WHO_MAX, ControlIn, StackIn, StackPreviewIn
from flake_registry.web.rendering import HTTP_STATUS_OF_CODE, page

NAV = NavEntry('planner', 'Stack planner', '/planner')
router = APIRouter(dependencies=[Depends(require_read)])


@router.get('/planner', response_class=HTMLResponse, include_in_schema=False)
def planner_page(request: Request, done: str = Query('', max_length=200)):
    store = web(request).store
    recipes = [{'recipe': r, 'state': control.recipe_state(store, r)} for r in stacks.list_recipes(store, limit=20)]
    return page(request, 'planner.html', {'page': 'planner', 'recipes': recipes, 'done': done,
                                          'who': request.cookies.get('labeller', '')})


@router.post('/api/stacks/preview')
def stack_preview(request: Request, body: StackPreviewIn):
    """Outlines of the layers in the stack frame [m], each layer's colour, and how much each covers the others."""
    preview = stacks.preview(web(request).store, [layer.to_layer() for layer in body.layers])
    for layer, style in zip(preview['layers'], drawing.layer_styles([entry['material'] for entry in preview['layers']]),
                            strict=True):
        layer.update(style)
    return preview


@router.post('/api/stacks', status_code=201, dependencies=[Depends(require_write)])
def stack_create(request: Request, body: StackIn):
    """Save a recipe and (by default) reserve every layer for ``robot_id``, all or none."""
    store = web(request).store
    layers = [layer.to_layer() for layer in body.layers]
    if body.reserve and not body.robot_id:
        raise RegistryError(INVALID_ARGUMENT, 'reserving a stack needs a robot_id')
    recipe = stacks.save_recipe(store, body.name, layers)
    if body.reserve:
        try:
            recipe = stacks.reserve_recipe(store, recipe.id, body.robot_id, body.lease_s)
        except RegistryError as refused:
            # The recipe is kept (it can be reserved later); say which flake blocked it.
            return JSONResponse({'error': {'code': refused.code, 'message': refused.message,
                                           'flake_id': refused.flake_id}, 'recipe': recipe.as_dict()},
                                status_code=HTTP_STATUS_OF_CODE.get(refused.code, 400))
    return recipe.as_dict(include_tokens=True)


@router.post('/api/stacks/{recipe_id}/reserve', dependencies=[Depends(require_write)])
def stack_reserve(request: Request, recipe_id: str, robot_id: str = Query(..., min_length=1, max_length=ROBOT_ID_MAX),
                  lease_s: float = Query(0.0, ge=0.0, le=7 * 86400.0)):
    """Reserve a saved recipe's flakes, all or none."""
    return stacks.reserve_recipe(web(request).store, recipe_id, robot_id, lease_s).as_dict(include_tokens=True)


@router.post('/api/stacks/{recipe_id}/release', dependencies=[Depends(require_write)])
def stack_release(request: Request, recipe_id: str, body: ControlIn):
    """Unreserve a stack: release every layer the recipe still holds; used layers stay used."""
    return control.release_stack(web(request).store, recipe_id, body.who)


@router.post('/planner/stacks/{recipe_id}/release', dependencies=[Depends(require_write)], include_in_schema=False)
def stack_release_form(request: Request, recipe_id: str, who: str = Form(..., max_length=WHO_MAX)):
    result = control.release_stack(web(request).store, recipe_id, who)
    done = f'recipe {recipe_id}: released {len(result["released"])} layer(s)'
    if result['kept']:
        done += f', {len(result["kept"])} not held any more'
    return RedirectResponse('/planner?' + urlencode({'done': done}), status_code=303)


@router.get('/api/stacks')
def stack_list(request: Request):
    return {'recipes': [r.as_dict() for r in stacks.list_recipes(web(request).store)]}


@router.get('/api/stacks/{recipe_id}')
def stack_export(request: Request, recipe_id: str, download: bool = False):
    """A saved recipe (no tokens); ``download`` names it as a file."""
    recipe = stacks.get_recipe(web(request).store, recipe_id)
    headers = {'Content-Disposition': f'attachment; filename="{recipe.id}.json"'} if download else None
    return JSONResponse(recipe.as_dict(), headers=headers)
