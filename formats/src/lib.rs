//! The `.smolmachine` file format and the trailer of packed executables.
