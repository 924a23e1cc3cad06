/**
 * Push install for Windows hosts over PowerShell remoting (WinRM), the Windows
 * half of the PushInstaller seam (the SSH path covers Linux).
 *
 * Plan, then apply: buildWindowsPushScript() is a pure function from host and
 * request to the PowerShell script that does the whole push (tests compare it
 * with test/install/golden/windows-push.ps1). WindowsPushInstaller.install()
 * runs that script in a local PowerShell process (node-powershell, which
 * spawns `pwsh`), reads the machine-readable lines it prints, and turns them
 * into a PushResult.
 *
 * What the script does on the host, one step each:
 *   connect   New-PSSession to host:port (5985 HTTP, or -UseSSL when the port is 5986)
 *   preflight account is an administrator; OS is 64-bit Windows 10 / Server 2016 or newer;
 *             C: has room for the bundle (4x its zip size) plus WINDOWS_PUSH_MIN_FREE_BYTES
 *   upload    new work directory under %SystemRoot%\Temp (ACL: Administrators only,
 *             not inherited), Copy-Item -ToSession of the bundle zip into it
 *   install   Expand-Archive, write the one-time token to a file in the work directory
 *             (it inherits the Administrators-only ACL), run the bundle's
 *             `install.ps1 -Server <url> -TokenFile <file> -Pin <fingerprint>`,
 *             delete the token file; the work directory and the session are removed at the end
 * then, in this process, `register` (waitForRegistration) and `done`.
 *
 * Line protocol on the script's stdout (anything else is ignored):
 *   MOBILITY-STEP <step> [detail]         a step starts
 *   MOBILITY-FAIL <MOB_ERR_PUSH_*> <text> the push failed in the last step started; nothing follows
 *   MOBILITY-INSTALLED <detail>           install.ps1 succeeded
 *
 * Secrets: the account password and the one-time token never appear in the
 * script text, the command line or node-powershell's command history/debug
 * log. They reach the script only as environment variables of the spawned
 * PowerShell process (MOBILITY_PUSH_PASSWORD, MOBILITY_PUSH_TOKEN); the script
 * turns the password into a SecureString/PSCredential, removes both variables
 * from its environment, and sends the token to the host only inside the
 * (encrypted) remoting session. Every message this module returns is scrubbed
 * of both values, and nothing here logs.
 *
 * Contract: install() never throws for a host's failure, nor for a missing
 * PowerShell (MOB_ERR_PUSH_NO_POWERSHELL); it is not idempotent (each call
 * installs again, with the token given). One call spawns one PowerShell
 * process and disposes of it before it waits for registration.
 *
 * Server requirements (not checkable here): PowerShell 7 (`pwsh`) on PATH (or
 * NODE_POWERSHELL naming it). From Linux, WSMan remoting also needs the
 * PSWSMan module's libmi, and WinRM then authenticates with NTLM (Negotiate)
 * or Basic over HTTPS (port 5986); Kerberos needs a domain-joined server.
 */
import fsp from 'node:fs/promises';
import { PowerShell } from 'node-powershell';
import { psQuote, wrapForInvoke } from '../util/powershell.js';
import { MiB } from '../constants.js';
import { MobilityError, isErrorCode, type ErrorCode } from '../errors.js';
import type { PushHost, PushInstaller, PushRequest, PushResult, PushStep } from './push-types.js';

// ---- Defaults and bounds -------------------------------------------------------------

export const WINRM_HTTP_PORT = 5985;
export const WINRM_HTTPS_PORT = 5986;
/** Free space the agent's program, state and logs need on C:, on top of 4x the bundle's zip size. */
export const WINDOWS_PUSH_MIN_FREE_BYTES = 512 * MiB;
/** New-PSSession gives up opening the session after this long (-> MOB_ERR_PUSH_UNREACHABLE). */
export const WINDOWS_PUSH_OPEN_TIMEOUT_MS = 30_000;
/** The whole script (connect .. install) is abandoned after this long; the shell is then killed. */
export const WINDOWS_PUSH_SCRIPT_TIMEOUT_MS = 30 * 60_000;
/** How long install() waits for the new agent to register, unless registrationTimeoutMs says otherwise. */
export const WINDOWS_PUSH_REGISTRATION_TIMEOUT_MS = 5 * 60_000;
/** Script output kept by the default shell while it streams (the tail is what matters). */
const MAX_STREAMED_OUTPUT_CHARS = 1 * MiB;
/** A partial line longer than this is dropped by the line splitter. */
const MAX_LINE_CHARS = 64 * 1024;
/** Failure messages quote at most this much of the script's other output. */
const MAX_TAIL_CHARS = 2000;

/** The environment variables that carry the secrets into the PowerShell process. */
export interface PushShellEnv {
  MOBILITY_PUSH_PASSWORD: string;
  MOBILITY_PUSH_TOKEN: string;
}

/**
 * The part of a PowerShell process the installer uses. invoke() runs one
 * script and resolves with its output once the script has finished; a shell
 * that can stream calls onOutput with stdout text as it arrives (so onStep is
 * reported live). invoke() rejects only when the shell process itself fails
 * (for node-powershell: a ProcessError, with `originalError.code` ENOENT when
 * the executable is missing). dispose() ends the process; it may be called
 * after a failed invoke.
 */
export interface PowerShellLike {
  invoke(script: string, onOutput?: (text: string) => void): Promise<{ raw: string; hadErrors?: boolean }>;
  dispose(): Promise<void>;
}

/**
 * Creates the shell for one push. It receives the secrets as environment
 * variables for the process it spawns and must not pass them on any other
 * way. A factory that ignores its argument (`() => fake`) is fine for tests.
 */
export type PowerShellFactory = (env: PushShellEnv) => PowerShellLike;

export interface WindowsPushOptions {
  /** Shell factory; default: defaultPowerShellFactory (a real `pwsh` through node-powershell). */
  shell?: PowerShellFactory;
  /** Upper bound on waitForRegistration; default WINDOWS_PUSH_REGISTRATION_TIMEOUT_MS. */
  registrationTimeoutMs?: number;
  /** Resolves with the agent id the host registered as, or null when it gave up waiting. */
  waitForRegistration?: (host: string) => Promise<string | null>;
  /** Parent directory on the host for the push's work directory (see buildWindowsPushScript). */
  remoteDir?: string;
}

// ---- The script ---------------------------------------------------------------------

export { psQuote, wrapForInvoke };

function winrmPort(host: PushHost): number {
  const port = host.port ?? WINRM_HTTP_PORT;
  if (!Number.isInteger(port) || port < 1 || port > 65535) {
    throw new MobilityError('MOB_ERR_CONFIG', `WinRM port of ${host.host} must be an integer in 1..65535, not ${String(port)}`);
  }
  return port;
}

/**
 * The PowerShell script that pushes the agent onto one host. Pure and
 * deterministic: no secret, no time, no randomness (the host picks the work
 * directory's name). Every interpolated value is a single-quoted literal.
 * `remoteDir` is the parent directory on the host under which a fresh
 * `mobility-push-<guid>` work directory is created and later removed
 * (default: %SystemRoot%\Temp); only that fresh directory is ever deleted.
 * Throws MOB_ERR_CONFIG for a port outside 1..65535.
 */
export function buildWindowsPushScript(host: PushHost, req: PushRequest, opts: { remoteDir?: string } = {}): string {
  const port = winrmPort(host);
  const head = [
    '# Mobility push install over PowerShell remoting. Generated by src/install/windows-push.ts; do not edit.',
    '# No secret is in this text: the account password and the one-time registration token are read from',
    '# $env:MOBILITY_PUSH_PASSWORD and $env:MOBILITY_PUSH_TOKEN of this PowerShell process, which then removes them.',
    '# Output, one line each: "MOBILITY-STEP <step> [detail]" when a step starts,',
    '# "MOBILITY-FAIL <MOB_ERR_PUSH_*> <message>" when the push fails (nothing follows),',
    '# "MOBILITY-INSTALLED <detail>" when install.ps1 succeeded.',
    'Set-StrictMode -Version 3.0',
    "$ErrorActionPreference = 'Stop'",
    "$ProgressPreference = 'SilentlyContinue'",
    '',
    `$MobilityHost = ${psQuote(host.host)}`,
    `$MobilityPort = ${port}`,
    `$MobilityUseSsl = ${port === WINRM_HTTPS_PORT ? '$true' : '$false'}`,
    `$MobilityUser = ${psQuote(host.user)}`,
    `$MobilityBundle = ${psQuote(req.bundle)}`,
    `$MobilityServerUrl = ${psQuote(req.serverUrl)}`,
    `$MobilityPin = ${psQuote(req.serverFingerprint)}`,
    '# Parent of the work directory on the host; empty means $env:SystemRoot\\Temp there.',
    `$MobilityRemoteParent = ${psQuote(opts.remoteDir ?? '')}`,
    `$MobilityMinFreeBytes = ${WINDOWS_PUSH_MIN_FREE_BYTES}`,
    `$MobilityOpenTimeoutMs = ${WINDOWS_PUSH_OPEN_TIMEOUT_MS}`,
    '',
  ];
  return head.concat(SCRIPT_BODY).join('\n') + '\n';
}

// The fixed part of the script. It uses no backticks, and never writes to
// stderr or the pipeline: node-powershell treats stderr output as a failed
// invocation, and [Console]::Out keeps the lines in order with its delimiters.
const SCRIPT_BODY: readonly string[] = [
  'function Write-MobilityLine([string]$Text) {',
  "  $line = ($Text -replace '\\s+', ' ').Trim()",
  "  if ($line.Length -gt 2000) { $line = $line.Substring(0, 2000) + '...' }",
  '  [Console]::Out.WriteLine($line)',
  '}',
  '',
  "function Write-MobilityStep([string]$Step, [string]$Detail = '') {",
  '  Write-MobilityLine "MOBILITY-STEP $Step $Detail"',
  '}',
  '',
  'function Write-MobilityFail([string]$Code, [string]$Message) {',
  '  Write-MobilityLine "MOBILITY-FAIL $Code $Message"',
  '}',
  '',
  '# Credentials or rights refused -> $DeniedCode; a broken or unreachable WinRM transport ->',
  '# MOB_ERR_PUSH_UNREACHABLE; anything else -> $OtherCode.',
  'function Get-MobilityErrorCode($ErrorRecord, [string]$DeniedCode, [string]$OtherCode) {',
  "  $text = [string]$ErrorRecord.Exception.Message + ' ' + [string]$ErrorRecord.FullyQualifiedErrorId",
  "  if ($text -match 'access is denied|access denied|accessdenied|access_denied|logon failure|user name or password|unauthori[sz]ed|authorization failed') { return $DeniedCode }",
  "  if ($ErrorRecord.Exception -is [System.Management.Automation.Remoting.PSRemotingTransportException]) { return 'MOB_ERR_PUSH_UNREACHABLE' }",
  '  return $OtherCode',
  '}',
  '',
  'function Invoke-MobilityPush {',
  "  Write-MobilityStep 'connect' ('{0}:{1}' -f $MobilityHost, $MobilityPort)",
  '  if ([string]::IsNullOrEmpty($env:MOBILITY_PUSH_PASSWORD)) {',
  "    Write-MobilityFail 'MOB_ERR_PUSH_AUTH' 'no password for the account was given to the PowerShell process'",
  '    return',
  '  }',
  '  if ([string]::IsNullOrEmpty($env:MOBILITY_PUSH_TOKEN)) {',
  "    Write-MobilityFail 'MOB_ERR_PUSH_INSTALL_FAILED' 'no registration token was given to the PowerShell process'",
  '    return',
  '  }',
  '  $password = ConvertTo-SecureString -String $env:MOBILITY_PUSH_PASSWORD -AsPlainText -Force',
  '  $token = $env:MOBILITY_PUSH_TOKEN',
  "  Remove-Item -LiteralPath 'Env:MOBILITY_PUSH_PASSWORD', 'Env:MOBILITY_PUSH_TOKEN' -ErrorAction SilentlyContinue",
  '  $credential = New-Object System.Management.Automation.PSCredential -ArgumentList $MobilityUser, $password',
  '  $sessionArgs = @{',
  '    ComputerName = $MobilityHost',
  '    Port = $MobilityPort',
  '    Credential = $credential',
  '    SessionOption = (New-PSSessionOption -OpenTimeout $MobilityOpenTimeoutMs)',
  '  }',
  "  if ($MobilityUseSsl) { $sessionArgs['UseSSL'] = $true }",
  '  try {',
  '    $session = New-PSSession @sessionArgs',
  '  } catch {',
  "    Write-MobilityFail (Get-MobilityErrorCode $_ 'MOB_ERR_PUSH_AUTH' 'MOB_ERR_PUSH_UNREACHABLE') ('cannot open a PowerShell remoting session to {0}:{1} as {2}: {3}' -f $MobilityHost, $MobilityPort, $MobilityUser, $_.Exception.Message)",
  '    return',
  '  }',
  '  $workDir = $null',
  '  try {',
  "    Write-MobilityStep 'preflight'",
  '    try {',
  '      $bundleBytes = (Get-Item -LiteralPath $MobilityBundle).Length',
  '    } catch {',
  "      Write-MobilityFail 'MOB_ERR_PUSH_INSTALL_FAILED' ('cannot read the bundle {0}: {1}' -f $MobilityBundle, $_.Exception.Message)",
  '      return',
  '    }',
  '    try {',
  '      $facts = Invoke-Command -Session $session -ScriptBlock {',
  "        $ErrorActionPreference = 'Stop'",
  '        $identity = [System.Security.Principal.WindowsIdentity]::GetCurrent()',
  '        $principal = New-Object System.Security.Principal.WindowsPrincipal -ArgumentList $identity',
  '        $os = Get-CimInstance -ClassName Win32_OperatingSystem',
  "        $drive = New-Object System.IO.DriveInfo -ArgumentList 'C'",
  '        [pscustomobject]@{',
  '          IsAdmin = $principal.IsInRole([System.Security.Principal.WindowsBuiltInRole]::Administrator)',
  '          Is64Bit = [System.Environment]::Is64BitOperatingSystem',
  '          Caption = [string]$os.Caption',
  '          Version = [string]$os.Version',
  '          Build = [int]$os.BuildNumber',
  '          ProductType = [int]$os.ProductType',
  '          FreeBytes = [long]$drive.AvailableFreeSpace',
  '        }',
  '      }',
  '    } catch {',
  "      Write-MobilityFail (Get-MobilityErrorCode $_ 'MOB_ERR_PUSH_NOT_ROOT' 'MOB_ERR_PUSH_OS_UNSUPPORTED') ('cannot query the system of {0}: {1}' -f $MobilityHost, $_.Exception.Message)",
  '      return',
  '    }',
  '    if (-not $facts.IsAdmin) {',
  "      Write-MobilityFail 'MOB_ERR_PUSH_NOT_ROOT' ('{0} is not an administrator on {1}: the agent installs a service and reads disks, so the account must be in BUILTIN\\Administrators' -f $MobilityUser, $MobilityHost)",
  '      return',
  '    }',
  "    $osName = '{0} {1}' -f $facts.Caption, $facts.Version",
  '    if (-not $facts.Is64Bit) {',
  "      Write-MobilityFail 'MOB_ERR_PUSH_OS_UNSUPPORTED' ('{0} on {1} is 32-bit: the agent needs 64-bit Windows' -f $osName, $MobilityHost)",
  '      return',
  '    }',
  '    # Windows 10 is build 10240 or later, Windows Server 2016 build 14393 or later (ProductType 1 = workstation).',
  '    $minBuild = 14393',
  '    if ($facts.ProductType -eq 1) { $minBuild = 10240 }',
  '    if (([version]$facts.Version).Major -lt 10 -or $facts.Build -lt $minBuild) {',
  "      Write-MobilityFail 'MOB_ERR_PUSH_OS_UNSUPPORTED' ('{0} on {1} is not supported: the agent needs Windows Server 2016 or Windows 10, or newer' -f $osName, $MobilityHost)",
  '      return',
  '    }',
  '    $needBytes = $MobilityMinFreeBytes + 4 * $bundleBytes',
  '    if ($facts.FreeBytes -lt $needBytes) {',
  "      Write-MobilityFail 'MOB_ERR_PUSH_LOW_DISK' ('C: on {0} has {1} MiB free; the bundle and the agent need {2} MiB' -f $MobilityHost, [math]::Floor($facts.FreeBytes / 1MB), [math]::Ceiling($needBytes / 1MB))",
  '      return',
  '    }',
  '',
  "    Write-MobilityStep 'upload' ('{0} bytes' -f $bundleBytes)",
  '    try {',
  '      $workDir = Invoke-Command -Session $session -ArgumentList $MobilityRemoteParent -ScriptBlock {',
  '        param([string]$Parent)',
  "        $ErrorActionPreference = 'Stop'",
  "        if ([string]::IsNullOrEmpty($Parent)) { $Parent = Join-Path $env:SystemRoot 'Temp' }",
  "        $dir = Join-Path $Parent ('mobility-push-' + [guid]::NewGuid().ToString('N'))",
  '        $null = [System.IO.Directory]::CreateDirectory($dir)',
  '        try {',
  '          # Only Administrators may open the work directory, and what is created in it (the token file) inherits that.',
  '          $acl = New-Object System.Security.AccessControl.DirectorySecurity',
  '          $acl.SetAccessRuleProtection($true, $false)',
  "          $admins = New-Object System.Security.Principal.SecurityIdentifier -ArgumentList 'S-1-5-32-544'",
  "          $rule = New-Object System.Security.AccessControl.FileSystemAccessRule -ArgumentList $admins, 'FullControl', 'ContainerInherit, ObjectInherit', 'None', 'Allow'",
  '          $acl.AddAccessRule($rule)',
  '          Set-Acl -LiteralPath $dir -AclObject $acl',
  '        } catch {',
  '          Remove-Item -LiteralPath $dir -Recurse -Force -ErrorAction SilentlyContinue',
  '          throw',
  '        }',
  '        $dir',
  '      }',
  "      Copy-Item -LiteralPath $MobilityBundle -Destination ($workDir + '\\mobility-agent.zip') -ToSession $session",
  '    } catch {',
  "      Write-MobilityFail (Get-MobilityErrorCode $_ 'MOB_ERR_PUSH_INSTALL_FAILED' 'MOB_ERR_PUSH_INSTALL_FAILED') ('cannot upload the bundle to {0}: {1}' -f $MobilityHost, $_.Exception.Message)",
  '      return',
  '    }',
  '',
  "    Write-MobilityStep 'install'",
  '    try {',
  '      $outcome = Invoke-Command -Session $session -ArgumentList $workDir, $token, $MobilityServerUrl, $MobilityPin -ScriptBlock {',
  '        param([string]$Dir, [string]$Token, [string]$ServerUrl, [string]$Pin)',
  "        $ErrorActionPreference = 'Stop'",
  "        $tokenFile = Join-Path $Dir 'registration.token'",
  '        try {',
  "          $expanded = Join-Path $Dir 'bundle'",
  "          Expand-Archive -LiteralPath (Join-Path $Dir 'mobility-agent.zip') -DestinationPath $expanded -Force",
  "          $installer = Get-ChildItem -LiteralPath $expanded -Filter 'install.ps1' -Recurse -File | Sort-Object -Property { $_.FullName.Length } | Select-Object -First 1",
  "          if ($null -eq $installer) { return [pscustomobject]@{ ExitCode = -1; Output = 'the bundle has no install.ps1' } }",
  '          [System.IO.File]::WriteAllText($tokenFile, $Token, (New-Object System.Text.UTF8Encoding -ArgumentList $false))',
  "          $powershell = Join-Path $env:SystemRoot 'System32\\WindowsPowerShell\\v1.0\\powershell.exe'",
  '          # The exit code decides; stderr lines of the installer must not become terminating errors.',
  "          $ErrorActionPreference = 'Continue'",
  '          $output = & $powershell -NoProfile -NonInteractive -ExecutionPolicy Bypass -File $installer.FullName -Server $ServerUrl -TokenFile $tokenFile -Pin $Pin 2>&1 | Out-String',
  '          $exitCode = $LASTEXITCODE',
  "          [pscustomobject]@{ ExitCode = $exitCode; Output = ([string]$output).Replace($Token, '[token]') }",
  '        } finally {',
  '          Remove-Item -LiteralPath $tokenFile -Force -ErrorAction SilentlyContinue',
  '        }',
  '      }',
  '    } catch {',
  "      Write-MobilityFail (Get-MobilityErrorCode $_ 'MOB_ERR_PUSH_INSTALL_FAILED' 'MOB_ERR_PUSH_INSTALL_FAILED') ('installing on {0} failed: {1}' -f $MobilityHost, $_.Exception.Message)",
  '      return',
  '    }',
  '    if ($outcome.ExitCode -ne 0) {',
  "      $tail = (([string]$outcome.Output -split '\\r?\\n') | Where-Object { $_.Trim() -ne '' } | Select-Object -Last 20) -join ' | '",
  "      Write-MobilityFail 'MOB_ERR_PUSH_INSTALL_FAILED' ('install.ps1 on {0} exited with code {1}: {2}' -f $MobilityHost, $outcome.ExitCode, $tail)",
  '      return',
  '    }',
  "    Write-MobilityLine ('MOBILITY-INSTALLED {0}' -f $osName)",
  '  } finally {',
  '    if ($null -ne $workDir) {',
  '      Invoke-Command -Session $session -ArgumentList $workDir -ScriptBlock { param([string]$Dir) Remove-Item -LiteralPath $Dir -Recurse -Force -ErrorAction SilentlyContinue } -ErrorAction SilentlyContinue',
  '    }',
  '    Remove-PSSession -Session $session -ErrorAction SilentlyContinue',
  '  }',
  '}',
  '',
  'try {',
  '  Invoke-MobilityPush',
  '} catch {',
  "  Write-MobilityFail 'MOB_ERR_PUSH_INSTALL_FAILED' ('unexpected error: {0}' -f $_.Exception.Message)",
  '}',
];

// ---- Reading the script's output ----------------------------------------------------

const STEPS: readonly PushStep[] = ['connect', 'preflight', 'upload', 'install', 'register', 'done'];

type ScriptLine =
  | { kind: 'step'; step: PushStep; detail?: string }
  | { kind: 'fail'; code: ErrorCode; message: string }
  | { kind: 'installed'; detail: string };

function parseLine(line: string): ScriptLine | null {
  const m = /^MOBILITY-(STEP|FAIL|INSTALLED)(?:\s+(.*))?$/.exec(line.trim());
  if (!m) return null;
  const rest = (m[2] ?? '').trim();
  if (m[1] === 'INSTALLED') return { kind: 'installed', detail: rest };
  const sp = rest.search(/\s/);
  const word = sp < 0 ? rest : rest.slice(0, sp);
  const tail = sp < 0 ? '' : rest.slice(sp + 1).trim();
  if (m[1] === 'STEP') {
    const step = STEPS.find((s) => s === word);
    if (!step) return null;
    return tail ? { kind: 'step', step, detail: tail } : { kind: 'step', step };
  }
  if (word.startsWith('MOB_ERR_PUSH_') && isErrorCode(word)) return { kind: 'fail', code: word, message: tail || word };
  return { kind: 'fail', code: 'MOB_ERR_PUSH_INSTALL_FAILED', message: `${word} ${tail}`.trim() };
}

interface ScriptOutcome {
  steps: Array<{ step: PushStep; detail?: string }>;
  fail?: { code: ErrorCode; message: string };
  installed?: string;
  /** Output lines that are not protocol lines (for messages). */
  other: string[];
}

function parseOutput(text: string): ScriptOutcome {
  const out: ScriptOutcome = { steps: [], other: [] };
  for (const line of text.split(/\r?\n/)) {
    const p = parseLine(line);
    if (!p) {
      if (line.trim()) out.other.push(line.trim());
    } else if (p.kind === 'step') {
      out.steps.push(p.detail === undefined ? { step: p.step } : { step: p.step, detail: p.detail });
    } else if (p.kind === 'fail') {
      out.fail ??= { code: p.code, message: p.message };
    } else {
      out.installed ??= p.detail;
    }
  }
  return out;
}

/** Splits streamed text into complete lines; a partial line is bounded by MAX_LINE_CHARS. */
class LineSplitter {
  private partial = '';
  feed(chunk: string): string[] {
    const parts = (this.partial + chunk).split(/\r?\n/);
    this.partial = parts.pop() ?? '';
    if (this.partial.length > MAX_LINE_CHARS) this.partial = '';
    return parts;
  }
}

function tailOf(lines: string[]): string {
  const s = lines.join(' | ');
  return s.length > MAX_TAIL_CHARS ? '...' + s.slice(-MAX_TAIL_CHARS) : s;
}

// ---- The default shell: node-powershell ---------------------------------------------

/**
 * A real PowerShell process (node-powershell v5, which spawns `pwsh` off
 * Windows and `powershell` on it, or $NODE_POWERSHELL). The secrets are passed
 * through spawnOptions.env, i.e. only to this child's environment: v5 supports
 * that, and it keeps them out of the command text, which node-powershell keeps
 * in `history` and prints under DEBUG. (The fallback, sending them in a first
 * invoke, would put them in both.) A missing executable does not throw here:
 * the spawn fails asynchronously and invoke() rejects with a ProcessError
 * whose originalError.code is ENOENT.
 */
export const defaultPowerShellFactory: PowerShellFactory = (env) => {
  const ps = new PowerShell({
    executableOptions: { '-NoProfile': true, '-NonInteractive': true },
    spawnOptions: { env: { ...process.env, ...env } },
    invocationTimeout: WINDOWS_PUSH_SCRIPT_TIMEOUT_MS,
    // Output on stderr is reported, not thrown: the script's own lines decide the result.
    throwOnInvocationError: false,
  });
  return {
    async invoke(script, onOutput) {
      let streamed = '';
      const listener = (chunk: string | Buffer) => {
        const text = String(chunk);
        streamed = (streamed + text).slice(-MAX_STREAMED_OUTPUT_CHARS);
        onOutput?.(text);
      };
      ps.streams.stdout.on('data', listener);
      try {
        const r = await ps.invoke(script);
        if (r.stdout === undefined && r.stderr === undefined) {
          // Timed out (node-powershell then returns no output): keep what streamed.
          const secs = Math.round(WINDOWS_PUSH_SCRIPT_TIMEOUT_MS / 1000);
          return { raw: `${streamed}\nMOBILITY-FAIL MOB_ERR_PUSH_INSTALL_FAILED the push script did not finish within ${secs} s`, hadErrors: true };
        }
        const out = r.stdout?.toString('utf8') ?? '';
        const err = r.stderr?.toString('utf8') ?? '';
        return { raw: err ? `${out}\n${err}` : out, hadErrors: r.hadErrors };
      } finally {
        ps.streams.stdout.off('data', listener);
      }
    },
    async dispose() {
      // After a failed spawn or a crash the exit promise rejects; there is nothing left to end.
      await ps.dispose().catch(() => undefined);
    },
  };
};

function missingExecutable(err: unknown): NodeJS.ErrnoException | null {
  const e = err as (NodeJS.ErrnoException & { originalError?: NodeJS.ErrnoException }) | undefined;
  for (const c of [e, e?.originalError]) {
    if (c && (c.code === 'ENOENT' || c.code === 'EACCES')) return c;
  }
  return null;
}

// ---- The installer ------------------------------------------------------------------

const FINGERPRINT_RE = /^[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){31}$/;

export class WindowsPushInstaller implements PushInstaller {
  private readonly shell: PowerShellFactory;
  private readonly registrationTimeoutMs: number;
  private readonly waitForRegistration: ((host: string) => Promise<string | null>) | undefined;
  private readonly remoteDir: string | undefined;

  constructor(opts: WindowsPushOptions = {}) {
    this.shell = opts.shell ?? defaultPowerShellFactory;
    this.registrationTimeoutMs = opts.registrationTimeoutMs ?? WINDOWS_PUSH_REGISTRATION_TIMEOUT_MS;
    this.waitForRegistration = opts.waitForRegistration;
    this.remoteDir = opts.remoteDir;
  }

  /**
   * Pushes the agent onto one Windows host; see the module comment for the
   * steps. onStep is called once per step reached, in order (live when the
   * shell streams, else when the script has finished); an exception thrown by
   * onStep is ignored. Resolves with ok:false and a MOB_ERR_PUSH_* code (or
   * MOB_ERR_CONFIG for a bad host/request: no password, missing bundle, bad
   * port/URL/fingerprint; MOB_ERR_INTERNAL when waitForRegistration throws);
   * never rejects.
   */
  async install(host: PushHost, req: PushRequest, onStep?: (step: PushStep, detail?: string) => void): Promise<PushResult> {
    const t0 = Date.now();
    const secrets = [req.token, host.password].filter((s): s is string => typeof s === 'string' && s.length > 0);
    const redact = (text: string) => secrets.reduce((acc, s) => acc.split(s).join('[redacted]'), text);
    const reached = new Set<PushStep>();
    let last: PushStep = 'connect';
    const step = (s: PushStep, detail?: string) => {
      if (reached.has(s)) return;
      reached.add(s);
      last = s;
      try {
        onStep?.(s, detail === undefined ? undefined : redact(detail));
      } catch {
        // A progress callback must not break a push.
      }
    };
    const fail = (at: PushStep, code: ErrorCode, message: string): PushResult =>
      ({ host: host.host, ok: false, code, message: redact(message), step: at, ms: Date.now() - t0 });

    const invalid = await validate(host, req);
    if (invalid) return fail('connect', 'MOB_ERR_CONFIG', invalid);
    let script: string;
    try {
      script = buildWindowsPushScript(host, req, this.remoteDir === undefined ? {} : { remoteDir: this.remoteDir });
    } catch (err) {
      return fail('connect', err instanceof MobilityError ? err.code : 'MOB_ERR_INTERNAL', (err as Error).message);
    }

    const env: PushShellEnv = { MOBILITY_PUSH_PASSWORD: host.password ?? '', MOBILITY_PUSH_TOKEN: req.token };
    let output: { raw: string; hadErrors?: boolean };
    let shell: PowerShellLike | undefined;
    try {
      shell = this.shell(env);
      const lines = new LineSplitter();
      output = await shell.invoke(wrapForInvoke(script), (text) => {
        for (const line of lines.feed(text)) {
          const p = parseLine(line);
          if (p?.kind === 'step') step(p.step, p.detail);
        }
      });
    } catch (err) {
      const missing = missingExecutable(err);
      if (missing) {
        return fail('connect', 'MOB_ERR_PUSH_NO_POWERSHELL',
          `the Windows push path needs PowerShell (pwsh) on the server, and it is not installed (${missing.message}): install PowerShell 7 on the Mobility server so that pwsh is on PATH`);
      }
      const msg = err instanceof Error ? err.message : String(err);
      return fail(last, 'MOB_ERR_PUSH_INSTALL_FAILED', `the PowerShell process failed: ${msg}`);
    } finally {
      await shell?.dispose().catch(() => undefined);
    }

    const parsed = parseOutput(output.raw);
    for (const s of parsed.steps) step(s.step, s.detail);
    if (parsed.fail) return fail(last, parsed.fail.code, parsed.fail.message);
    if (parsed.installed === undefined) {
      const why = output.hadErrors ? 'PowerShell reported errors' : 'no MOBILITY-INSTALLED line';
      return fail(last, 'MOB_ERR_PUSH_INSTALL_FAILED', `the push script ended without a result (${why}): ${tailOf(parsed.other) || 'no output'}`);
    }
    const installedOn = parsed.installed ? ` on ${parsed.installed}` : '';

    if (!this.waitForRegistration) {
      step('done');
      return { host: host.host, ok: true, message: redact(`installed${installedOn}; registration not awaited`), step: 'done', ms: Date.now() - t0 };
    }
    step('register');
    let agentId: string | null;
    let timer: NodeJS.Timeout | undefined;
    try {
      const timeout = new Promise<null>((resolve) => { timer = setTimeout(() => resolve(null), this.registrationTimeoutMs); });
      agentId = await Promise.race([this.waitForRegistration(host.host), timeout]);
    } catch (err) {
      return fail('register', 'MOB_ERR_INTERNAL', `waiting for the registration of ${host.host} failed: ${err instanceof Error ? err.message : String(err)}`);
    } finally {
      clearTimeout(timer);
    }
    if (agentId === null) {
      return fail('register', 'MOB_ERR_PUSH_REG_TIMEOUT',
        `the agent was installed${installedOn} but did not register within ${Math.round(this.registrationTimeoutMs / 1000)} s`);
    }
    step('done', agentId);
    return { host: host.host, ok: true, message: redact(`installed${installedOn}; registered as ${agentId}`), step: 'done', agentId, ms: Date.now() - t0 };
  }
}

/** Why this host/request cannot be pushed at all (checked before any process is spawned), or null. */
async function validate(host: PushHost, req: PushRequest): Promise<string | null> {
  if (!host.host) return 'the host name is empty';
  if (host.keyFile !== undefined || !host.password) {
    return `Windows push to ${host.host} needs the account's password (key files are for SSH)`;
  }
  if (!req.token) return 'the registration token is empty';
  try {
    const st = await fsp.stat(req.bundle);
    if (!st.isFile()) return `the bundle ${req.bundle} is not a file`;
  } catch (err) {
    return `cannot read the bundle ${req.bundle}: ${(err as Error).message}`;
  }
  let url: URL;
  try {
    url = new URL(req.serverUrl);
  } catch {
    return `the server URL ${req.serverUrl} is not a URL`;
  }
  if (url.protocol !== 'wss:' && url.protocol !== 'https:') return `the server URL ${req.serverUrl} must be wss:// or https://`;
  if (!FINGERPRINT_RE.test(req.serverFingerprint)) return 'the server fingerprint must be a SHA-256 fingerprint (AA:BB:... 32 bytes)';
  return null;
}
