//! Root filesystem image builders.
