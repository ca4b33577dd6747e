//! webhook notifier (being written).
