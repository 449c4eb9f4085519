"""ComfyUI's two workflow formats, from ComfyUI's own description of its nodes (``/object_info``).

The API format (what ``/prompt`` takes) names each node's inputs: a literal for a widget, ``[node, output]``
for a link. The UI format (what the editor opens) lists nodes with their link slots and their widgets'
values in the order the node declares its inputs (a seed widget with ``control_after_generate`` is followed
by that control's value), and the links apart. :func:`api_to_ui` lays an API workflow out for the editor;
the pack's example workflows in the UI format are exactly that (``tests/test_comfyui_nodes.py``), so they
cannot drift from the API ones that the tests run.
"""

from __future__ import annotations

from typing import Any

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
COLUMN, ROW = 380, 280


def _is_widget(spec: list) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _inputs(info: dict) -> list[tuple[str, list]]:
    order = info["input_order"]
    return [(name, info["input"][group][name]) for group in ("required", "optional") for name in order.get(group, [])]


def _depths(api: dict[str, dict]) -> dict[str, int]:
    depth: dict[str, int] = {}

    def of(node: str) -> int:
        if node not in depth:
            sources = [value[0] for value in api[node]["inputs"].values() if isinstance(value, list)]
            depth[node] = 1 + max((of(s) for s in sources), default=-1)
        return depth[node]

    for node in api:
        of(node)
    return depth


def api_to_ui(api: dict[str, dict], object_info: dict[str, dict]) -> dict[str, Any]:
    """The UI-format workflow of ``api``: nodes in columns by their distance from the inputs."""
    depth = _depths(api)
    rows: dict[int, int] = {}
    links: list[list] = []
    outgoing: dict[tuple[int, int], list[int]] = {}
    nodes = []
    for node_id in sorted(api, key=int):
        node = api[node_id]
        info = object_info[node["class_type"]]
        slots, widgets = [], []
        for name, spec in _inputs(info):
            value = node["inputs"].get(name)
            linked = isinstance(value, list)
            if _is_widget(spec):
                options = spec[1] if len(spec) > 1 else {}
                default = options.get("default", spec[0][0] if isinstance(spec[0], list) and spec[0] else None)
                # A widget fed by a link keeps no value of its own (the editor shows the link).
                widgets.append(None if linked else value if name in node["inputs"] else default)
                if options.get("control_after_generate"):
                    widgets.append("fixed")
                if not linked:
                    continue
            elif not linked:
                slots.append({"name": name, "type": spec[0], "link": None})
                continue
            link_id = len(links) + 1
            origin, slot = int(value[0]), value[1]
            kind = object_info[api[value[0]]["class_type"]]["output"][slot]
            links.append([link_id, origin, slot, int(node_id), len(slots), kind])
            outgoing.setdefault((origin, slot), []).append(link_id)
            entry = {"name": name, "type": "COMBO" if isinstance(spec[0], list) else spec[0], "link": link_id}
            if _is_widget(spec):
                entry["widget"] = {"name": name}
            slots.append(entry)
        column = depth[node_id]
        row = rows.get(column, 0)
        rows[column] = row + 1
        nodes.append({
            "id": int(node_id), "type": node["class_type"], "pos": [50 + COLUMN * column, 50 + ROW * row],
            "size": [320, 120 + 26 * len(widgets)], "flags": {}, "order": 0, "mode": 0, "inputs": slots,
            "outputs": [{"name": name, "type": kind, "links": [], "slot_index": index}
                        for index, (kind, name) in enumerate(zip(info["output"], info["output_name"], strict=True))],
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets,
            **({"title": node["_meta"]["title"]} if "title" in node.get("_meta", {}) else {}),
        })
    for node in nodes:
        for output in node["outputs"]:
            output["links"] = outgoing.get((node["id"], output["slot_index"]), [])
    for order, node in enumerate(sorted(nodes, key=lambda n: (depth[str(n["id"])], n["id"]))):
        node["order"] = order
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}
