//! The Kafka sink's producer: idempotent; keys, headers and timestamps kept.

use super::KafkaSinkConfig;
use crate::clients::kafka::{client_config, ClientEvents, ProducerContext, Role};
use crate::record::{Origin, OutputRef};
use crate::sinks::{Rejected, Sink};
use anyhow::Context;
use async_trait::async_trait;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::time::Duration;

pub struct KafkaSink {
    producer: FutureProducer<ProducerContext>,
    /// The producer's connection errors; cleared by a delivered batch.
    events: std::sync::Arc<ClientEvents>,
    topic: String,
}

impl KafkaSink {
    /// The producer of sink `name` of `pipeline`.
    pub fn new(config: &KafkaSinkConfig, name: &str, pipeline: &str) -> anyhow::Result<Self> {
        let mut client = client_config(config.brokers(), &config.properties);
        // The whole batch is enqueued before its deliveries are awaited, so a
        // long linger only delays the batch's end.
        for (key, value) in [("linger.ms", "1"), ("compression.type", config.compression.name())] {
            if !config.properties.contains_key(key) {
                client.set(key, value);
            }
        }
        client.set("client.id", format!("sluice-{pipeline}")).set("enable.idempotence", "true");
        let events = std::sync::Arc::new(ClientEvents::new(pipeline, Role::Sink(name.to_string()), config.brokers()));
        let producer =
            client.create_with_context(ProducerContext(events.clone())).context("cannot create the Kafka producer")?;
        Ok(KafkaSink { producer, events, topic: config.topic.clone() })
    }
}

/// Errors that no retry can fix: the record is dead-lettered instead.
fn is_permanent(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidRecord | RDKafkaErrorCode::InvalidMessage
        )
    )
}

#[async_trait]
impl Sink for KafkaSink {
    async fn write(&self, batch: &[OutputRef<'_>], _origins: &[&Origin]) -> anyhow::Result<Vec<Rejected>> {
        let mut pending = Vec::with_capacity(batch.len());
        let mut rejected = Vec::new();
        for (index, out) in batch.iter().enumerate() {
            let headers = out.headers.iter().fold(OwnedHeaders::new_with_capacity(out.headers.len()), |hs, h| {
                hs.insert(Header { key: &h.name, value: Some(&h.value[..]) })
            });
            loop {
                let mut record =
                    FutureRecord::<[u8], [u8]>::to(&self.topic).payload(out.value).headers(headers.clone());
                if let Some(key) = out.key {
                    record = record.key(key);
                }
                if let Some(ts) = out.timestamp {
                    record = record.timestamp(ts);
                }
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push((index, delivery));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((error, _)) if is_permanent(&error) => {
                        rejected.push(Rejected { index, reason: format!("kafka sink: {error}") });
                        break;
                    }
                    Err((error, _)) => return Err(error).context(format!("cannot produce to {}", self.topic)),
                }
            }
        }
        for (index, delivery) in pending {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((error, _))) if is_permanent(&error) => {
                    rejected.push(Rejected { index, reason: format!("kafka sink: {error}") })
                }
                Ok(Err((error, _))) => return Err(error).context(format!("delivery to {} failed", self.topic)),
                Err(_) => anyhow::bail!("the Kafka producer shut down before delivery to {}", self.topic),
            }
        }
        self.events.ok();
        Ok(rejected)
    }
}
