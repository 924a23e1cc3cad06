/** The console's stylesheet (served as /console/assets/console.css): compact tables, state colours. */
export const STYLES = `
:root { --ok: #1e8449; --busy: #2471a3; --warn: #b9770e; --bad: #c0392b; --off: #7f8c8d; --fo: #7d3c98; --line: #dfe3e8; --bg: #f6f7f9; }
* { box-sizing: border-box; }
body { margin: 0; font: 13px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1c2833; background: var(--bg); }
header { display: flex; align-items: center; gap: 16px; padding: 6px 16px; background: #1c2833; color: #fff; }
header a { color: #d6eaf8; text-decoration: none; } header a:hover { text-decoration: underline; }
header .brand { font-weight: 700; color: #fff; font-size: 15px; }
header nav { display: flex; gap: 14px; flex: 1; }
header .logout { display: flex; align-items: center; gap: 8px; margin: 0; }
.live-state { color: #7f8c8d; } .live-state.on { color: #58d68d; } .live-state.off { color: #e74c3c; }
main { padding: 10px 16px 40px; max-width: 1500px; }
h1 { font-size: 18px; margin: 6px 0; } h2 { font-size: 14px; margin: 16px 0 6px; display: flex; gap: 12px; align-items: center; }
section { margin-bottom: 8px; }
table.grid { border-collapse: collapse; width: 100%; background: #fff; border: 1px solid var(--line); }
table.grid th { text-align: left; font-weight: 600; background: #eef1f4; color: #34495e; }
table.grid th, table.grid td { padding: 3px 8px; border-bottom: 1px solid var(--line); white-space: nowrap; vertical-align: middle; }
table.grid td.dim, table.grid td.mono { white-space: normal; }
table.grid tr.active td { background: #fdedec; }
.dim { color: #7f8c8d; } .mono, code { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; }
.badge { display: inline-block; padding: 0 7px; border-radius: 9px; color: #fff; font-size: 12px; font-weight: 600; background: var(--off); }
.badge.ok { background: var(--ok); } .badge.busy { background: var(--busy); } .badge.warn { background: var(--warn); } .badge.bad { background: var(--bad); } .badge.fo { background: var(--fo); }
.rpo.ok { color: var(--ok); font-weight: 600; } .rpo.warn { color: var(--warn); font-weight: 600; } .rpo.bad { color: var(--bad); font-weight: 700; }
.tag { font-size: 11px; padding: 0 5px; border-radius: 3px; border: 1px solid; } .tag.app { color: var(--ok); } .tag.crash { color: var(--busy); }
progress { width: 90px; height: 10px; vertical-align: middle; } meter { width: 70px; height: 10px; vertical-align: middle; }
.tiles { display: flex; gap: 10px; flex-wrap: wrap; margin: 6px 0 4px; }
.tile { background: #fff; border: 1px solid var(--line); border-left: 4px solid var(--off); padding: 6px 12px; min-width: 110px; }
.tile b { display: block; font-size: 20px; } .tile span { color: #566573; }
.tile.ok { border-left-color: var(--ok); } .tile.busy { border-left-color: var(--busy); } .tile.warn { border-left-color: var(--warn); } .tile.bad { border-left-color: var(--bad); }
.actions form.inline { display: flex; flex-wrap: wrap; gap: 8px; align-items: center; margin: 4px 0; padding: 6px 8px; background: #fff; border: 1px solid var(--line); }
label { display: inline-flex; gap: 4px; align-items: center; }
input, select { font: inherit; padding: 2px 4px; border: 1px solid #aab7b8; border-radius: 3px; }
select { max-width: 360px; }
button { font: inherit; padding: 3px 10px; border: 1px solid #2471a3; background: #2471a3; color: #fff; border-radius: 3px; cursor: pointer; }
button.small { padding: 0 8px; font-size: 12px; } button.danger { background: var(--bad); border-color: var(--bad); }
button:disabled { opacity: .5; cursor: progress; }
.ranges button { background: #fff; color: #2471a3; } .ranges button.on { background: #2471a3; color: #fff; }
#flash { display: none; margin: 8px 16px 0; padding: 6px 10px; border-radius: 3px; background: #fff; border: 1px solid var(--line); }
#flash.show { display: block; } #flash.ok { border-left: 4px solid var(--ok); } #flash.bad { border-left: 4px solid var(--bad); color: var(--bad); } #flash.busy { border-left: 4px solid var(--busy); }
#charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 8px; }
.chart { background: #fff; border: 1px solid var(--line); min-height: 200px; }
svg.timeline { width: 100%; height: 48px; background: #fff; border: 1px solid var(--line); }
svg.timeline line.axis { stroke: #aab7b8; stroke-width: 1; } svg.timeline line.crash { stroke: var(--busy); stroke-width: 2; } svg.timeline line.app { stroke: var(--ok); stroke-width: 3; }
.axis-labels { display: flex; justify-content: space-between; color: #7f8c8d; font-size: 11px; margin-bottom: 4px; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 12px; margin: 8px 0; } dl.facts dt { color: #566573; } dl.facts dd { margin: 0; }
body.login main { display: flex; justify-content: center; padding-top: 12vh; }
.card { background: #fff; border: 1px solid var(--line); padding: 20px 24px; }
.login-form { display: flex; flex-direction: column; gap: 10px; width: 320px; } .login-form label { display: flex; flex-direction: column; align-items: stretch; }
.error { color: var(--bad); font-weight: 600; }
`;
