/** The consistency of a cut: crash-consistent (filesystems frozen) or app-consistent (hooks quiesced the applications too). */
export type CutKind = 'crash' | 'app';
