//! A process type's step graph as an SVG drawing: steps in columns by their distance from
//! the start, edges as curves (dashed and labelled for outcomes other than `ok`, looping
//! back below the nodes for edges to an earlier column), joins (steps with several inbound
//! steps) marked with their rule (`join all` drawn with a double border), and,
//! for a process, each step coloured by its status with its visit count.

use honua_shared::definition::{Join, ProcessDefinition};
use honua_shared::record::ProcessRecord;
use maud::{Markup, html};
use std::collections::BTreeMap;

const W: i64 = 250;
const H: i64 = 48;
const GAP_X: i64 = 56;
const GAP_Y: i64 = 20;
const PAD: i64 = 12;

/// Column of each step: the longest path from a start step, not following edges that
/// close a cycle (found by depth-first search).
fn columns(def: &ProcessDefinition) -> BTreeMap<&str, i64> {
    let mut col: BTreeMap<&str, i64> = BTreeMap::new();
    // Forward edges only: drop those closing a cycle.
    let mut forward: Vec<(&str, &str)> = Vec::new();
    let mut state: BTreeMap<&str, u8> = BTreeMap::new(); // 1 on stack, 2 done
    fn dfs<'a>(
        def: &'a ProcessDefinition,
        n: &'a str,
        state: &mut BTreeMap<&'a str, u8>,
        forward: &mut Vec<(&'a str, &'a str)>,
    ) {
        state.insert(n, 1);
        if let Some(s) = def.step(n) {
            for targets in s.routes.values() {
                for t in targets {
                    match state.get(t.as_str()) {
                        Some(1) => {}
                        Some(_) => forward.push((n, t)),
                        None => {
                            forward.push((n, t));
                            dfs(def, t, state, forward);
                        }
                    }
                }
            }
        }
        state.insert(n, 2);
    }
    for s in &def.start {
        if !state.contains_key(s.as_str()) {
            dfs(def, s, &mut state, &mut forward);
        }
    }
    for s in &def.steps {
        if !state.contains_key(s.name.as_str()) {
            dfs(def, &s.name, &mut state, &mut forward);
        }
    }
    for s in &def.steps {
        col.insert(&s.name, 0);
    }
    // Longest path by relaxation (a DAG now: at most |steps| rounds).
    for _ in 0..def.steps.len() {
        let mut changed = false;
        for (a, b) in &forward {
            let c = col[a] + 1;
            if col[b] < c {
                col.insert(b, c);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    col
}

/// The SVG of `def`; with `rec`, nodes carry the process's step statuses.
pub(super) fn render(def: &ProcessDefinition, rec: Option<&ProcessRecord>) -> Markup {
    let col = columns(def);
    let mut rows: BTreeMap<i64, i64> = BTreeMap::new();
    let mut pos: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    for s in &def.steps {
        let c = col[s.name.as_str()];
        let r = rows.entry(c).or_insert(0);
        pos.insert(&s.name, (PAD + c * (W + GAP_X), PAD + *r * (H + GAP_Y)));
        *r += 1;
    }
    let ncols = rows.keys().max().map_or(1, |c| c + 1);
    let nrows = rows.values().max().copied().unwrap_or(1);
    let width = PAD * 2 + ncols * W + (ncols - 1) * GAP_X;
    let loop_room = 40;
    let height = PAD * 2 + nrows * H + (nrows - 1) * GAP_Y + loop_room;
    let bottom = height - loop_room / 2;
    let mut edges = Vec::new();
    for s in &def.steps {
        for (outcome, targets) in &s.routes {
            for t in targets {
                let (Some(&(ax, ay)), Some(&(bx, by))) =
                    (pos.get(s.name.as_str()), pos.get(t.as_str()))
                else {
                    continue;
                };
                let back = col[t.as_str()] <= col[s.name.as_str()];
                let (d, lx, ly) = if back {
                    let (x1, y1) = (ax + W / 2, ay + H);
                    let (x2, y2) = (bx + W / 2, by + H);
                    (
                        format!("M{x1},{y1} C{x1},{bottom} {x2},{bottom} {x2},{y2}"),
                        (x1 + x2) / 2,
                        bottom - 4,
                    )
                } else {
                    let (x1, y1) = (ax + W, ay + H / 2);
                    let (x2, y2) = (bx, by + H / 2);
                    let mx = (x1 + x2) / 2;
                    (
                        format!("M{x1},{y1} C{mx},{y1} {mx},{y2} {x2},{y2}"),
                        mx,
                        (y1 + y2) / 2 - 4,
                    )
                };
                edges.push((d, outcome.as_str(), lx, ly));
            }
        }
    }
    let label = format!(
        "Step graph of {} v{}: {}",
        def.name,
        def.version,
        def.steps
            .iter()
            .map(|s| {
                let st = rec
                    .and_then(|r| r.steps.get(&s.name))
                    .map(|r| r.status.to_string());
                match st {
                    Some(st) => format!("{} {st}", s.name),
                    None => s.name.clone(),
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    );
    html! {
        div.dag tabindex="0" role="group" aria-label={"Step graph of " (def.name)} {
            svg.dag viewBox={"0 0 " (width) " " (height)} width=(width) height=(height) role="img" aria-label=(label) {
                defs {
                    marker #arrow viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse" {
                        path.arrowhead d="M0,0 L10,5 L0,10 z" {}
                    }
                }
                @for (d, outcome, lx, ly) in &edges {
                    path class={"edge" @if *outcome != "ok" { " cond" }} d=(d) marker-end="url(#arrow)" {}
                    @if *outcome != "ok" { text.edge-label x=(lx) y=(ly) text-anchor="middle" { (outcome) } }
                }
                @for s in &def.steps {
                    @let (x, y) = pos[s.name.as_str()];
                    @let r = rec.and_then(|r| r.steps.get(&s.name));
                    @let status = r.map_or("idle".to_string(), |r| r.status.to_string());
                    @let joins = def.inbound(&s.name).len() > 1;
                    g class={"node st-" (status)} data-step=(s.name) data-status=(status) {
                        rect x=(x) y=(y) width=(W) height=(H) rx="6" {}
                        @if joins && s.join == Join::All { rect.join x=(x + 3) y=(y + 3) width=(W - 6) height=(H - 6) rx="4" {} }
                        text.name x=(x + 10) y=(y + 19) { (s.name) }
                        text.sub x=(x + 10) y=(y + 37) {
                            (s.kind)
                            @if let Some(r) = r { " · " (status) @if r.visit > 1 { " · ×" (r.visit) } }
                            @if joins { @if s.join == Join::All { " · join all" } @else { " · join any" } }
                            @if let Some(m) = s.max_visits { " · max " (m) }
                        }
                    }
                }
            }
        }
    }
}
