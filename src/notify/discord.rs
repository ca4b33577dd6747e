//! discord notifier (being written).
