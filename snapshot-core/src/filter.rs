//! containerd's filter language for `walk` (SEMANTICS.md §1.5). Being written.
