//! PostgreSQL wake-ups: a trigger on the outbox (see the migration) sends
//! `NOTIFY gpuops_outbox` when a row is added or gets newer state; every
//! replica LISTENs on its own connection and wakes its delivery worker. The
//! worker still polls every few seconds, so a lost notification (the
//! listener reconnecting) only delays a delivery.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::AsyncMessage;

use crate::store::pg::{Pg, OWNER_LOCK};

impl Pg {
    /// Calls `wake` on every notification until `stop` turns true;
    /// reconnects (with a growing pause) when the connection drops.
    pub fn spawn_listener(
        &self,
        wake: Arc<dyn Fn() + Send + Sync>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let settings = self.settings.clone();
        let replica = self.replica.clone();
        tokio::spawn(async move {
            let mut pause = Duration::from_millis(200);
            loop {
                let connected = tokio::time::timeout(
                    settings.connect_timeout,
                    settings.config.connect(settings.tls.clone()),
                )
                .await;
                match connected {
                    Ok(Ok((client, mut conn))) => {
                        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
                        let driver = tokio::spawn(async move {
                            while let Some(Ok(m)) =
                                std::future::poll_fn(|cx| conn.poll_message(cx)).await
                            {
                                if let AsyncMessage::Notification(_) = m {
                                    let _ = tx.send(());
                                }
                            }
                        });
                        // This connection lives as long as the replica: it
                        // also holds the lock that says the replica is alive.
                        let owner = client
                            .execute(
                                "SELECT pg_advisory_lock($1::int4, hashtext($2))",
                                &[&(OWNER_LOCK as i32), &&*replica],
                            )
                            .await;
                        if owner.is_ok()
                            && client.batch_execute("LISTEN gpuops_outbox").await.is_ok()
                        {
                            pause = Duration::from_millis(200);
                            // Rows added while we were not listening.
                            wake();
                            loop {
                                tokio::select! {
                                    got = rx.recv() => match got {
                                        Some(()) => wake(),
                                        None => break,
                                    },
                                    _ = stop.wait_for(|s| *s) => {
                                        driver.abort();
                                        return;
                                    }
                                }
                            }
                        }
                        driver.abort();
                        tracing::warn!(store = %settings.shown, "lost the PostgreSQL LISTEN connection; reconnecting");
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(store = %settings.shown, error = %crate::store::Error::from(e), "cannot LISTEN")
                    }
                    Err(_) => tracing::debug!(store = %settings.shown, "LISTEN connect timed out"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        });
    }
}
