//! slack notifier (being written).
