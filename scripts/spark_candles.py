"""1-minute OHLC candles per symbol in Spark 3.5: the job Sluice's
pipelines/candles.toml replaces, on the same capture, for
scripts/bench-spark.sh. Spark is measured at its best: hot (a warm-up run
first, in the same JVM), over the whole capture at once, with a sink that
does nothing, and its CPU read from the JVM's own counters between the
start and the end of each measured query (start-up and warm-up left out).

Reads Finnhub frames (one JSON object per line) from a folder, explodes the
trades, and aggregates per (1-minute window of the trade time, symbol):
open and close by time (ties to the lowest open, the highest close, as
Sluice does), high, low, volume, VWAP and the trade count.

Usage: spark_candles.py INPUT_DIR OUTPUT_PREFIX [CORES]. In one JVM:
1. a warm-up: the streaming query once (class loading, JIT, code generation);
2. measured: the Structured Streaming query, one `availableNow` trigger over
   every file, into the `noop` sink;
3. measured: the same aggregation as a batch job, into `noop`;
4. not measured: the batch job's candles, written to
   OUTPUT_PREFIX.candles.csv for the exactness check against Sluice's.
Writes OUTPUT_PREFIX.result: `streaming WALL_S CPU_S` and `batch WALL_S CPU_S`.
"""
import os
import resource
import sys
import time

from pyspark.sql import SparkSession, functions as F, types as T

source, out = sys.argv[1], sys.argv[2]
cores = sys.argv[3] if len(sys.argv) > 3 else "2"
spark = (
    SparkSession.builder.master(f"local[{cores}]")
    .appName("candles")
    .config("spark.sql.shuffle.partitions", cores)
    .config("spark.ui.enabled", "false")
    .getOrCreate()
)
spark.sparkContext.setLogLevel("WARN")
jvm = spark.sparkContext._gateway.proc.pid
ticks = os.sysconf("SC_CLK_TCK")


def cpu_seconds():
    """The JVM's CPU (user + system, every thread: /proc/PID/stat) and this driver's."""
    with open(f"/proc/{jvm}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    me = resource.getrusage(resource.RUSAGE_SELF)
    return (int(fields[11]) + int(fields[12])) / ticks + me.ru_utime + me.ru_stime


trade = T.StructType(
    [
        T.StructField("s", T.StringType()),
        T.StructField("p", T.DoubleType()),
        T.StructField("t", T.LongType()),
        T.StructField("v", T.DoubleType()),
        T.StructField("c", T.ArrayType(T.StringType())),
    ]
)
frame = T.StructType([T.StructField("type", T.StringType()), T.StructField("data", T.ArrayType(trade))])


def candles_of(frames):
    trades = (
        frames.where(F.col("type") == "trade")
        .select(F.explode("data").alias("d"))
        .select(
            F.col("d.s").alias("symbol"),
            F.col("d.p").alias("price"),
            F.col("d.v").alias("volume"),
            F.col("d.t").alias("t"),
            (F.col("d.t") / 1000).cast("timestamp").alias("ts"),
        )
    )
    return trades.groupBy(F.window("ts", "1 minute"), "symbol").agg(
        F.min_by("price", F.struct("t", "price")).alias("open"),
        F.max("price").alias("high"),
        F.min("price").alias("low"),
        F.max_by("price", F.struct("t", "price")).alias("close"),
        F.sum("volume").alias("volume"),
        (F.sum(F.col("price") * F.col("volume")) / F.sum("volume")).alias("vwap"),
        F.count(F.lit(1)).alias("trades"),
    )


def streaming(run):
    """The streaming query over every file in one trigger, into `noop`."""
    query = (
        candles_of(spark.readStream.schema(frame).json(source))
        .writeStream.outputMode("update")
        .format("noop")
        .option("checkpointLocation", f"{out}_checkpoint_{run}")
        .trigger(availableNow=True)
        .start()
    )
    query.awaitTermination()


def batch():
    candles_of(spark.read.schema(frame).json(source)).write.format("noop").mode("overwrite").save()


def measured(job):
    cpu, wall = cpu_seconds(), time.time()
    job()
    return time.time() - wall, cpu_seconds() - cpu


streaming("warm-up")
stream_wall, stream_cpu = measured(lambda: streaming("measured"))
batch_wall, batch_cpu = measured(batch)
rows = candles_of(spark.read.schema(frame).json(source)).select(
    "symbol",
    (F.col("window.start").cast("double") * 1000).cast("long").alias("window_start"),
    "open",
    "high",
    "low",
    "close",
    "volume",
    "trades",
)
with open(out + ".candles.csv", "w") as csv:
    for r in rows.collect():
        csv.write(f"{r.symbol},{r.window_start},{r.open!r},{r.high!r},{r.low!r},{r.close!r},{r.volume!r},{r.trades}\n")
with open(out + ".result", "w") as result:
    result.write(f"streaming {stream_wall:.2f} {stream_cpu:.2f}\nbatch {batch_wall:.2f} {batch_cpu:.2f}\n")
spark.stop()
