/**
 * Structured logging through winston: JSON lines when stderr is not a terminal
 * (or when asked), short readable lines on a terminal. Secrets never go here.
 */
import winston from 'winston';

export type Logger = winston.Logger;

/**
 * file: also write JSON lines to this file, rotated by size (10 MiB x 5 files), as a
 * daemon under a service manager does; the terminal (stderr) keeps its own format.
 */
export function createLogger(opts: { level?: string; json?: boolean; silent?: boolean; component?: string; file?: string } = {}): Logger {
  const json = opts.json ?? !process.stderr.isTTY;
  const format = json
    ? winston.format.combine(winston.format.timestamp(), winston.format.json())
    : winston.format.combine(
        winston.format.timestamp({ format: 'HH:mm:ss' }),
        winston.format.printf((i) => {
          const { level, message, timestamp, component, ...rest } = i as Record<string, unknown>;
          const extra = Object.keys(rest).length ? ' ' + JSON.stringify(rest) : '';
          return `${String(timestamp)} ${String(level)}${component ? ` [${String(component)}]` : ''} ${String(message)}${extra}`;
        }),
      );
  return winston.createLogger({
    level: opts.level ?? process.env.MOBILITY_LOG_LEVEL ?? 'info',
    silent: opts.silent ?? false,
    defaultMeta: opts.component ? { component: opts.component } : undefined,
    format,
    transports: [
      new winston.transports.Stream({ stream: process.stderr }),
      ...(opts.file ? [new winston.transports.File({
        filename: opts.file, maxsize: 10 * 1024 * 1024, maxFiles: 5, tailable: true,
        format: winston.format.combine(winston.format.timestamp(), winston.format.json()),
      })] : []),
    ],
  });
}
