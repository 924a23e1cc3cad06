/**
 * What every PowerShell script this project generates shares: quoting values into script
 * text, and the one-line form a script is sent to a shell in (node-powershell reads one
 * command per line).
 */

/** A PowerShell single-quoted string literal of s. PowerShell also ends such strings at the typographic quotes U+2018..U+201B, so those are doubled too. */
export function psQuote(s: string): string {
  return `'${s.replace(/['\u2018\u2019\u201A\u201B]/g, (q) => q + q)}'`;
}

/**
 * The one line actually sent to the shell. node-powershell feeds commands to
 * `pwsh -Command -` line by line, where a multi-line block needs a blank line
 * to run; a single line that decodes and runs the script avoids that, and any
 * quoting of the script text.
 */
export function wrapForInvoke(script: string): string {
  const b64 = Buffer.from(script, 'utf8').toString('base64');
  return `& ([scriptblock]::Create([System.Text.Encoding]::UTF8.GetString([System.Convert]::FromBase64String('${b64}'))))`;
}
