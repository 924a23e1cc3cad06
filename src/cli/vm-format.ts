/**
 * `mobility machines`: the VMs of a host agent (host mode), indented under the host's row.
 * Rows come from GET /v1/machines (machines[].vms, see server/http/config-api.ts MachineVm);
 * the fields are JSON from the server, so anything missing shows "-" rather than throwing.
 */
export interface MachineVmRow {
  agentId: string; name: string; status?: string; qmpSocket?: string; guestAgentSocket?: string | null; reported?: boolean;
  inventoryDisks?: { device?: string; node?: string; format?: string; sizeBytes?: number }[];
  error?: { code?: string; message?: string } | null;
  policy?: string | null; disks?: { diskId: string; device: string }[];
}

const MiB = 1024 ** 2;
const size = (n: number | undefined) => (typeof n !== 'number' ? '?' : n >= 1024 * MiB ? `${(n / (1024 * MiB)).toFixed(1)} GiB` : `${Math.round(n / MiB)} MiB`);

/** The protection of a VM in a word or two: not protected, or N disk(s) protected under a policy. */
function protection(v: MachineVmRow): string {
  const n = v.disks?.length ?? 0;
  if (n === 0) return 'not protected';
  return `${n} disk(s) protected, policy ${v.policy ?? 'default'}`;
}

/** "VMs of HOST:" then one indented line per VM and one per disk; "" for a host with no VM. */
export function formatHostVms(hostId: string, vms: MachineVmRow[]): string {
  if (!Array.isArray(vms) || vms.length === 0) return `${hostId} is a host agent; it reports no VM\n`;
  const rows = vms.map((v) => [
    v.name, v.agentId, v.error ? `unreachable (${v.error.code ?? '?'})` : v.status ?? '-',
    String(v.inventoryDisks?.length ?? 0), v.guestAgentSocket ? 'yes' : 'no', protection(v),
  ]);
  const header = ['VM', 'MACHINE', 'STATE', 'DISKS', 'GUEST AGENT', 'PROTECTION'];
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells: string[]) => '  ' + cells.map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i]))).join('  ') + '\n';
  let out = `VMs of ${hostId}:\n` + line(header);
  for (const [i, v] of vms.entries()) {
    out += line(rows[i]);
    if (v.error?.message) out += `      ${v.error.message}\n`;
    for (const d of v.inventoryDisks ?? []) {
      const on = v.disks?.find((x) => x.device === `qemu:${d.node ?? ''}`);
      out += `      ${d.device ?? '-'}  node ${d.node ?? '-'}  ${d.format ?? '-'}  ${size(d.sizeBytes)}${on ? `  protected as ${on.diskId}` : ''}\n`;
    }
  }
  return out;
}
